"""Stream a local HF model dir into a (4-bit) model without ever holding the full bf16 model.

The skeleton is built on the meta device (parameters only; buffers such as rotary tables are
real). Tensors are then read one at a time from the safetensors shards: each linear weight that
will be quantized is read in row chunks and goes straight to NF4 on the target device, so no
whole bf16 weight is ever materialized; everything else (embeddings, norms, lm_head) is cast to
the compute dtype and placed. Peak host memory is the quantized model plus one small tensor.

Under an engine that shards the base (FSDP2, ZeRO-3; see `RowShard`) every rank reads only the
rows it will own (for an NF4 weight: whole quantization blocks), quantizes them and keeps only
those: peak host memory per rank is its share of the NF4 model plus one chunk. Per-rank row reads
rather than "rank 0 reads and scatters block by block": both hold one tensor beyond the share,
but here every rank reads and quantizes 1/N of the model in parallel instead of N-1 ranks
waiting on one, for one all-gather of the block absmax per double-quantized weight (4 bytes per
64 weights). A reasoned choice, not a measured one (no scatter loader was written to compare);
`python -m benchmarks.bench_sharding` reports each rank's peak while loading.

Reads go through `SafetensorsFile` (plain reads into tensors we own; see safetensors_read.py
for why it is kept over the library's mapped `get_slice`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from qtrain.errors import ModelError
from qtrain.models.arch import auto_model_class, read_config
from qtrain.models.key_map import checkpoint_key_map
from qtrain.models.safetensors_read import SafetensorsFile
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec, NF4Weight
from qtrain.quant.shard import RowShard, mark_full_shape

# Values per streamed chunk of a weight being quantized (~2 MiB of bf16).
CHUNK_ELEMS = 1 << 20


def shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"model.path: no safetensors weights in {model_dir} (expected model.safetensors or "
                     "model.safetensors.index.json; convert .bin checkpoints with save_pretrained(safe_serialization=True))")


def iter_tensors(files: list[Path]) -> Iterator[tuple[SafetensorsFile, str]]:
    for f in files:
        with SafetensorsFile(f) as fh:
            for key in fh.keys():
                yield fh, key


def keep_in_fp32(model: nn.Module, module_name: str) -> bool:
    """Whether `module_name` is one of the model's `_keep_in_fp32_modules` (matched as a name suffix)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(module_name == k or module_name.endswith("." + k) for k in keep)


def quantizable_linears(model: nn.Module) -> set[str]:
    """Every nn.Linear except the output head (QLoRA keeps lm_head in the compute dtype) and the
    model's keep-in-fp32 modules."""
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not keep_in_fp32(model, n)}


def param_dtype(model: nn.Module, key: str, dtype: torch.dtype, dense: tuple[str, ...] = ()) -> torch.dtype:
    """The dtype a floating-point tensor `key` is placed in: `dtype`, except fp32 for a keep-in-fp32
    module under fp16 (as transformers' from_pretrained does) and for the caller's dense modules."""
    module = key.rpartition(".")[0]
    if (dtype == torch.float16 and keep_in_fp32(model, module)) or under(module, dense):
        return torch.float32
    return dtype


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def build_skeleton(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model class its config names (causal or seq2seq LM), parameters on the meta device."""
    from accelerate import init_empty_weights

    config = read_config(model_dir, trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, quantize: NF4Spec | None,
               backend: str = "bnb", trust_remote_code: bool = False, shard: RowShard = RowShard(),
               dense: Callable[[nn.Module], list[str]] | None = None) -> nn.Module:
    """Load `model_dir` onto `device`; with `quantize`, every non-head linear becomes an `NF4Linear`.

    With a sharded `shard`, every frozen base tensor holds only this rank's rows (marked with
    the whole tensor's shape) until an engine adopts them; see the module docstring.
    `dense(skeleton)` names modules kept out of quantization: their tensors load unquantized in fp32
    (layer freezing trains them in full precision while the rest of the model stays 4-bit).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"model.path: {model_dir} is not a Hugging Face model dir (no config.json)")
    files = shard_files(model_dir)
    model = build_skeleton(model_dir, dtype, trust_remote_code)
    keep = tuple(dense(model)) if dense is not None else ()
    to_quantize = {n for n in quantizable_linears(model) if not under(n, keep)} if quantize is not None else set()
    # Every name, tied aliases included (T5's lm_head / encoder.embed_tokens of `shared`): a checkpoint
    # that holds an alias's own tensor gets it untied, as transformers' from_pretrained does.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    biases: dict[str, nn.Parameter] = {}
    model_key = checkpoint_key_map(model, model_dir)  # stored names -> the model's (as from_pretrained)
    for fh, stored in iter_tensors(files):
        key = model_key(stored)
        module_name, _, leaf = key.rpartition(".")
        if module_name in to_quantize:
            loaded.add(key)
            if leaf == "weight":
                rows = functools.partial(fh.rows, stored)
                nf4 = NF4Weight.quantize_rows(rows, fh.shape(stored), dtype, quantize, shard, device, CHUNK_ELEMS)
                model.set_submodule(module_name, NF4Linear(nf4, None, backend))
            else:
                biases[module_name] = local_parameter(fh, stored, shard, device, dtype)
            continue
        if key not in params:
            continue  # e.g. rotary tables some checkpoints carry; the model builds its own
        place_parameter(model, key, local_parameter(fh, stored, shard, device, param_dtype(model, key, dtype, keep)))
        loaded.add(key)
    for name, bias in biases.items():
        model.get_submodule(name).bias = bias
    tie_missing(model, set(params) - loaded)
    _check_complete(model, model_dir)
    model.eval()
    return model


def local_parameter(fh: SafetensorsFile, key: str, shard: RowShard, device: torch.device,
                    dtype: torch.dtype) -> nn.Parameter:
    """A frozen parameter of this rank's rows of a tensor kept unquantized (floats cast to `dtype`)."""
    shape = fh.shape(key)
    rows = None if shard.whole or not shape else shard.rows(shape[0])
    tensor = fh.read(key) if rows is None else fh.rows(key, *rows)
    value = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
    param = nn.Parameter(value, requires_grad=False)
    if rows is not None:
        mark_full_shape(param, shape)
    return param


def tie_missing(model: nn.Module, missing: set[str]) -> None:
    """Tie the model's tied parameters as from_pretrained does, given the names the checkpoint lacked.

    A tied name absent from the checkpoint shares its partner's tensor; when both are present with
    different values (e.g. FLAN-T5's own lm_head next to `shared`) they stay separate.
    """
    model.tie_weights(missing_keys=missing, recompute_mapping=False)


def place_parameter(model: nn.Module, key: str, param: nn.Parameter) -> None:
    """Replace the (meta) parameter `key` with `param` (which owns its memory: see safetensors_read.py)."""
    module_name, _, leaf = key.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = param


def _check_complete(model: nn.Module, model_dir: Path) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    leftover = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.is_meta]
    missing += [f"{n}.weight" for n in leftover if f"{n}.weight" not in missing]
    if missing:
        raise ModelError(f"model.path: {model_dir} has no weights for {missing[0]} ({len(missing)} tensors missing); "
                         "the checkpoint does not match its config.json")
