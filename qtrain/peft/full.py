"""Full fine-tuning: every weight trains (fp32 master weights; compute under the recipe's autocast).

The baseline the parameter-efficient methods are measured against. The base is loaded
unquantized (config/methods.py: `unquantized_base`); a checkpoint holds every trained weight in
`weights.safetensors` (resume is bit-exact) and the run leaves `model/`, a plain HF model dir.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qtrain.checkpoint import full_io
from qtrain.config.schema import PeftConfig
from qtrain.peft.artifact import trainable_named
from qtrain.peft.method import ArtifactContext, LoadOptions, Method


class Full(Method):
    name = "full"
    artifact_dir = "model"
    # The fused loss accumulates dW in the compute dtype and assumes a frozen head in it; full
    # fine-tuning trains the head from fp32 master weights under autocast.
    fused_loss = False
    merge_refusal = "full fine-tuning already leaves a whole model dir (model/); there is no adapter to merge"

    def load_options(self, cfg: PeftConfig, dtype: torch.dtype, quantize: bool) -> LoadOptions:
        return LoadOptions(torch.float32, False)

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        for p in model.parameters():
            p.requires_grad_(True)
        return []

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return "full fine-tuning (fp32 master weights)"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_named(model)

    def save_artifact(self, model: nn.Module, ctx: ArtifactContext, out_dir: str | Path) -> Path:
        return full_io.save_model_dir(model, ctx.tokenizer, ctx.dtype, out_dir)

    def checkpoint_files(self) -> list[str]:
        return [full_io.WEIGHTS_NAME]

    def save_checkpoint(self, model: nn.Module, ctx: ArtifactContext, ckpt_dir: Path) -> None:
        full_io.write_weights(model, ckpt_dir / full_io.WEIGHTS_NAME)

    def load_checkpoint(self, model: nn.Module, ckpt_dir: Path) -> None:
        full_io.load_weights(model, ckpt_dir / full_io.WEIGHTS_NAME)
