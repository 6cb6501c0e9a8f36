"""Layer freezing: train the top K blocks (or a range of blocks) in full precision, freeze the rest.

Later blocks carry the task-specific part of a pretrained model, so tuning only them adapts it
(lecture: "fine-tuning the top layers only"). The trained blocks are loaded unquantized in fp32
(master weights; compute runs under the recipe's autocast) while every other linear stays NF4 and
frozen, so the memory saving of the 4-bit base holds for the frozen part. Blocks are counted in
the output-side block list of the architecture spec (T5: the decoder).

Artifact (qtrain's own format, docs/methods.md): adapter_config.json with `qtrain_method: freeze`,
`block_list` and `layer_range`; adapter_model.safetensors holds those blocks' parameters under
their Hugging Face names, in fp32. Checkpoints hold the same (resume is exact). Merging writes the
base with those blocks replaced: a full HF model dir.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.arch_spec import arch_spec, block_lists
from qtrain.peft.layer import freeze
from qtrain.peft.method import LoadOptions, Method, task_type_of


def block_range(model: nn.Module, cfg: PeftConfig) -> tuple[str, int, int]:
    """(block list path, start, end) of the blocks `cfg` trains, checked against the model."""
    path, blocks = block_lists(model, arch_spec(model, "layer freezing"))[-1]
    n = len(blocks)
    if cfg.layer_range is not None:
        start, end = cfg.layer_range
        if end > n:
            raise ConfigError(f"peft.layer_range: {cfg.layer_range} reaches past the model's {n} blocks in {path}; "
                              f"use [start, end) with end <= {n}")
        return path, start, end
    if cfg.layers_to_train > n:
        raise ConfigError(f"peft.layers_to_train: {cfg.layers_to_train}, but {path} has {n} blocks; use at most {n}")
    return path, n - cfg.layers_to_train, n


def trained_blocks(model: nn.Module, cfg: PeftConfig) -> list[str]:
    path, start, end = block_range(model, cfg)
    return [f"{path}.{i}" for i in range(start, end)]


def _under(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


class Freeze(Method):
    name = "freeze"

    def load_options(self, cfg: PeftConfig, dtype: torch.dtype, quantize: bool) -> LoadOptions:
        return LoadOptions(dtype, quantize, dense=lambda skeleton: trained_blocks(skeleton, cfg))

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        freeze(model)
        blocks = trained_blocks(model, cfg)
        for block in blocks:
            for p in model.get_submodule(block).parameters():
                if p.dtype != torch.float32:  # loaded without the method's load options
                    p.data = p.data.float()
                p.requires_grad_(True)
        return blocks

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"layer freezing: {len(names)} top block(s) trained in fp32 ({', '.join(names)})"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        blocks = trained_blocks_of(model)
        return {n: p for n, p in model.named_parameters() if _under(n, blocks)}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        path, start, end = block_range(model, cfg)
        return {"qtrain_method": self.name, "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "block_list": path, "layer_range": [start, end], "dtype": "float32"}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        start, end = config["layer_range"]
        return PeftConfig(method=self.name, layer_range=[int(start), int(end)])


def trained_blocks_of(model: nn.Module) -> list[str]:
    """The blocks whose parameters train (what `inject` made trainable), from the model itself."""
    spec = arch_spec(model, "layer freezing")
    out = []
    for path, blocks in block_lists(model, spec):
        out += [f"{path}.{i}" for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    return out
