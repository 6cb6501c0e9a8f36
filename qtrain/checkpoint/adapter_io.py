"""Adapters on disk: save an injected model's adapter, read any adapter dir.

The format is the method's (qtrain.peft.<method>): peft's keys and adapter_config.json where
peft has the method, so `peft.PeftModel.from_pretrained` loads what we write; `task_type` is
SEQ_2_SEQ_LM for an encoder-decoder base (T5 family) and CAUSAL_LM otherwise. The file handling
itself (atomic writes, strict reads) is qtrain.peft.artifact.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.peft.artifact import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter
from qtrain.peft.method import ArtifactContext, task_type_of
from qtrain.peft.registry import method_for

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "read_adapter", "save_adapter", "task_type_of"]


def save_adapter(model: nn.Module, cfg: PeftConfig, base_model: str, out_dir: str | Path) -> Path:
    """Write the adapter of `cfg.method` dir atomically: readers see the old adapter or the whole new one."""
    return method_for(cfg).save_artifact(model, ArtifactContext(cfg, base_model), out_dir)
