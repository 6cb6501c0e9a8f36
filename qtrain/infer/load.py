"""Load a base model and its adapters for inference: frozen, eval mode, read-only adapters.

The base is the one the adapter names in `adapter_config.json` (`base_model_name_or_path`) unless
the caller passes another; it is loaded by qtrain's own streaming loader (NF4 by default, as
training saw it, or unquantized).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qtrain.checkpoint.adapter_io import CONFIG_NAME
from qtrain.errors import CheckpointError, ConfigError, ModelError
from qtrain.infer.adapters import AdapterSet
from qtrain.models.load import load_model
from qtrain.models.tokenizer import load_tokenizer
from qtrain.quant.nf4 import NF4Spec
from qtrain_kernels import dispatch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class BaseOptions:
    """How the base is loaded. `quant=None` loads it unquantized in `dtype`."""

    dtype: torch.dtype = torch.bfloat16
    quant: Optional[NF4Spec] = field(default_factory=NF4Spec)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    kernels: str = "auto"


def parse_adapter_args(values: list[str]) -> dict[str, str]:
    """`--adapter DIR` / `--adapter NAME=DIR` values → {name: dir}; a bare DIR is named `default`
    (`default`, `default2`, ... for several)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "default", value
            k = 2
            while name in out:
                name, k = f"default{k}", k + 1
        elif name in out:
            raise ConfigError(f"--adapter {value}: the name {name!r} is given twice; give each adapter its own name")
        if not path:
            raise ConfigError(f"--adapter {value}: no directory after '='; use --adapter NAME=DIR")
        out[name] = path
    return out


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model dir an adapter was trained on, from its adapter_config.json."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise CheckpointError(f"adapter dir not found: {d} (pass the adapter/ dir a training run wrote, "
                              "e.g. runs/quickstart/adapter)")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"adapter file missing: {cfg_path} (an adapter dir holds {CONFIG_NAME} and "
                              "adapter_model.safetensors)")
    try:
        base = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot parse {cfg_path}: {exc}") from None
    if not base:
        raise CheckpointError(f"{cfg_path}: base_model_name_or_path is empty; pass the base model dir with --base DIR")
    return str(base)


def resolve_base(adapters: dict[str, str], base: Optional[str]) -> Path:
    """`base` if given, else the one base every adapter names (CheckpointError when they disagree)."""
    named = {name: adapter_base(path) for name, path in adapters.items()}
    if base is not None:
        return Path(base)
    distinct = sorted(set(named.values()))
    if len(distinct) > 1:
        listing = "; ".join(f"{n}: {b}" for n, b in named.items())
        raise CheckpointError(f"the adapters name different base models ({listing}); pass --base DIR to load them "
                              "all on one base (their shapes are checked)")
    path = Path(distinct[0])
    if not (path / "config.json").is_file():
        first = next(iter(adapters.values()))
        raise CheckpointError(f"{Path(first) / CONFIG_NAME}: its base model {path} is not a model dir here "
                              "(no config.json); pass the base model dir with --base DIR")
    return path


def load_base(base_dir: str | Path, opts: BaseOptions) -> nn.Module:
    try:
        backend = dispatch.resolve(opts.kernels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model = load_model(base_dir, opts.dtype, opts.device, opts.quant, backend)
    model.eval()
    return model


def load_tokenizer_for(base_dir: Path, adapter_dirs: list[str]):
    """The base dir's tokenizer, or else the first adapter dir holding one."""
    for d in [base_dir, *map(Path, adapter_dirs)]:
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return load_tokenizer(str(d), key="tokenizer")
    raise ModelError(f"no tokenizer in {base_dir} or the adapter dirs; save the tokenizer into the base model dir")


def load_with_adapters(adapters: dict[str, str], base: Optional[str] = None,
                       opts: Optional[BaseOptions] = None) -> tuple[nn.Module, AdapterSet, object, Path]:
    """(model, adapter set with every adapter added and the first active, tokenizer, base dir)."""
    if not adapters:
        raise ConfigError("no adapter given; pass --adapter DIR (or NAME=DIR, repeatable)")
    opts = opts or BaseOptions()
    base_dir = resolve_base(adapters, base)
    tokenizer = load_tokenizer_for(base_dir, list(adapters.values()))
    model = load_base(base_dir, opts)
    aset = AdapterSet(model)
    for name, path in adapters.items():
        aset.add_adapter(name, path)
    aset.set_adapter(next(iter(adapters)))
    return model, aset, tokenizer, base_dir
