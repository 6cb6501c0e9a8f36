"""The interface every fine-tuning method implements (one file per method, see registry.py).

The trainer, checkpointing, inference, eval and compare never branch on a method's name; they ask
its `Method` object:

- recipe contract: `rules` (keys it reads, what it needs; config/methods.py), `needs_padded_batches`;
- training: `load_options` (how the base is loaded), `inject` (freeze the base, attach and return
  what was adapted; a model it cannot serve is a ConfigError with the reason), `enable_checkpointing`,
  `describe`, `penalty` (a regularizer added once per optimizer step), `report` (summary figures);
- artifacts: `state` (artifact key -> live tensor), `artifact_state` / `artifact_config` (the
  files a user keeps, peft's format where peft has the method), `load_state`, `save_artifact`;
- checkpoints: `checkpoint_files`, `save_checkpoint`, `load_checkpoint` (bit-exact resume: the
  trainable state, in the artifact's form, plus `state_file` where the artifact drops some of it);
- inference: `config_from_artifact`, `attach` (add a saved adapter to a model's holders, for an
  `AdapterSet`), `merge_refusal` (None when the math allows folding it into the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from qtrain.config.methods import METHOD_RULES, MethodRules
from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.models.arch import model_is_encoder_decoder
from qtrain.peft import artifact
from qtrain.peft.layer import prepare_recompute

ADAPTER_DIR = "adapter"


@dataclass
class LoadOptions:
    """How the base model is loaded for a method."""

    dtype: torch.dtype
    quantize: bool
    # Given the model skeleton, the module names whose weights load unquantized in fp32 (what the
    # method trains in full precision); None: none.
    dense: Optional[Callable[[nn.Module], list[str]]] = None


@dataclass
class ArtifactContext:
    """What saving needs besides the model: the recipe's peft section and the base it points at."""

    cfg: PeftConfig
    base_model: str
    tokenizer: object = None
    dtype: Optional[torch.dtype] = None  # the recipe's model dtype (a saved full model's)


def task_type_of(model: nn.Module) -> str:
    """peft's task type for `model`: SEQ_2_SEQ_LM (encoder-decoder) or CAUSAL_LM."""
    return "SEQ_2_SEQ_LM" if model_is_encoder_decoder(model) else "CAUSAL_LM"


class Method:
    name: ClassVar[str]
    # peft's PeftType where peft has the method (the artifact is then peft's format), else None.
    peft_type: ClassVar[Optional[str]] = None
    # What a finished run leaves under output_dir: adapter/ (an adapter dir) or model/ (an HF model dir).
    artifact_dir: ClassVar[str] = ADAPTER_DIR
    # Whether the fused linear + cross-entropy may replace the logits (it assumes a frozen lm_head
    # in the compute dtype and the model's own sequence).
    fused_loss: ClassVar[bool] = True
    # Why the adapter cannot be folded into the base weights; None when `qtrain merge` can.
    merge_refusal: ClassVar[Optional[str]] = None
    # Where a checkpoint keeps the trainable state when the artifact holds only a derived form of it
    # (prefix tuning's folded MLP, diff pruning's sparse delta): `state` is then that full state.
    state_file: ClassVar[Optional[str]] = None

    @property
    def rules(self) -> MethodRules:
        return METHOD_RULES[self.name]

    @property
    def artifact_is_model(self) -> bool:
        """The run leaves a whole model dir (evaluated and served as a base, with no adapter)."""
        return self.artifact_dir != ADAPTER_DIR

    @property
    def needs_padded_batches(self) -> bool:
        """The method changes the sequence: one example per padded row, never packed batches."""
        return self.rules.padded_batches

    # ---- training -------------------------------------------------------------------------------

    def load_options(self, cfg: PeftConfig, dtype: torch.dtype, quantize: bool) -> LoadOptions:
        """How to load the base: the recipe's dtype and quantization unless the method needs otherwise."""
        return LoadOptions(dtype, quantize)

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        """Freeze the base, attach the method's trainable parts; returns the adapted module names.
        `tokenizer` is for methods that initialise from text (prompt tuning's prompt_init: text)."""
        raise NotImplementedError

    def enable_checkpointing(self, model: nn.Module, recompute: str) -> None:
        """Called once gradient checkpointing is on: the recompute flags of the adapted linear layers."""
        prepare_recompute(model, recompute)

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"{self.name} on {len(names)} modules"

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """A regularizer added to the loss once per optimizer step (None: none)."""
        return None

    def report(self, model: nn.Module) -> dict:
        """Extra figures for summary.json (e.g. achieved sparsity)."""
        return {}

    # ---- artifacts ------------------------------------------------------------------------------

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Artifact key -> the model's live tensor; the default artifact and checkpoint are exactly these."""
        raise NotImplementedError

    def artifact_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return artifact.to_cpu(self.state(model))

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        raise NotImplementedError

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put an artifact's tensors into an injected model (strict: keys, shapes, finite)."""
        artifact.load_named(self.state(model), tensors)

    def save_artifact(self, model: nn.Module, ctx: ArtifactContext, out_dir: str | Path) -> Path:
        config = self.artifact_config(model, ctx.cfg, ctx.base_model)
        return artifact.save_adapter_dir(self.artifact_state(model), config, out_dir)

    # ---- checkpoints ----------------------------------------------------------------------------

    def checkpoint_files(self) -> list[str]:
        return [f"{ADAPTER_DIR}/{artifact.WEIGHTS_NAME}"] + ([self.state_file] if self.state_file else [])

    def save_checkpoint(self, model: nn.Module, ctx: ArtifactContext, ckpt_dir: Path) -> None:
        """The adapter dir (usable on its own), and the full trainable state where the artifact drops some."""
        (ckpt_dir / ADAPTER_DIR).mkdir()
        config = self.artifact_config(model, ctx.cfg, ctx.base_model)
        artifact.write_adapter_files(self.artifact_state(model), config, ckpt_dir / ADAPTER_DIR)
        if self.state_file:
            save_file(artifact.to_cpu(self.state(model)), str(ckpt_dir / self.state_file))

    def load_checkpoint(self, model: nn.Module, ckpt_dir: Path) -> None:
        if self.state_file:
            artifact.load_named(self.state(model), artifact.read_tensors(ckpt_dir / self.state_file))
            return
        _, tensors = artifact.read_adapter(ckpt_dir / ADAPTER_DIR)
        self.load_state(model, tensors)

    # ---- inference ------------------------------------------------------------------------------

    def config_from_artifact(self, config: dict) -> PeftConfig:
        """The recipe settings an adapter_config.json records (KeyError/TypeError/ValueError if malformed)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, name: str, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
               source: str) -> None:
        """Add a saved adapter to an inference model's holders as `name` (checked strictly; see holder.py)."""
        raise CheckpointError(f"{source}: a {self.name} run leaves a model, not an adapter; load it as the base")

    def refuse(self, reason: str) -> ConfigError:
        return ConfigError(f"peft.method: {self.name}: {reason}")
