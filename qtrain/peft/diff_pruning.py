"""Diff pruning: a learned sparse delta on the targeted weights (Guo et al. 2021).

    W' = W + z ⊙ δ        δ starts at zero (a fresh adapter is the base bit for bit)

z is a hard-concrete gate per entry (Louizos et al. 2018): sampled from log_alpha while training,
deterministic in eval. The L0 penalty is the expected share of open gates above the target
density, l0_weight · max(0, E[density] − (1 − target_sparsity)), added to the loss once per
optimizer step. With Adam the gate logits then move by about the learning rate per step, so how
far training closes gates is set by the schedule; the saved delta enforces the target: it keeps
the largest |z ⊙ δ| entries of each weight, at most (1 − target_sparsity) of them, and the run
reports the achieved sparsity (summary.json: diff_sparsity).

Training keeps δ and log_alpha dense in fp32 (twice the targeted weights, plus Adam's state): the
method saves storage per task, not training memory, so `targets: auto` is the attention
projections only. The base product goes through the LoRA dispatch point (NF4 or dense, fused
kernels included); the delta is one extra dense GEMM with z ⊙ δ.

Artifact (qtrain's own format, docs/methods.md): adapter_config.json with `qtrain_method:
diff_pruning`, `target_modules`, `sparsity`; adapter_model.safetensors holds per layer
`<layer>.diff_indices` (int64, flat row-major indices into the [out, in] weight) and
`<layer>.diff_values` (fp32). Checkpoints also hold `diff_state.safetensors` (dense δ and
log_alpha) so that resume is exact. Merging adds the delta to W (exact) and is allowed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError
from qtrain.models.arch_spec import arch_spec
from qtrain.peft import artifact
from qtrain.peft.artifact import PREFIX
from qtrain.peft.layer import AdaptedLinear, compute_dtype, module_device
from qtrain.peft.linear_method import LinearMethod
from qtrain.peft.lora import recorded_targets
from qtrain.peft.method import task_type_of
from qtrain.peft.multi_linear import LinearEntry
from qtrain.quant.linear import kernel_kwargs
from qtrain_kernels.lora_linear import lora_linear

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # hard-concrete temperature and stretch (Louizos et al.)
LOG_ALPHA_INIT = 3.0  # deterministic gate 1 (sigmoid(3)·1.2 − 0.1 > 1): every entry starts open
OPEN = 10.0  # log_alpha of a loaded delta: its gate is exactly 1


def gate(log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
    """The hard-concrete gate z in [0, 1]: a stretched, clamped sample while training, its median in eval."""
    if training:
        u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) per entry: the expected L0 norm's summands."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class DiffLinear(AdaptedLinear):
    def __init__(self, base: nn.Module, l0_weight: float = 0.0, density: float = 1.0) -> None:
        super().__init__(base)
        # The recipe's penalty settings, read by DiffPruning.penalty/artifact_state.
        self.l0_weight, self.density = l0_weight, density
        shape, device = (self.out_features, self.in_features), module_device(base)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        self.log_alpha = nn.Parameter(torch.full(shape, LOG_ALPHA_INIT, dtype=torch.float32, device=device))

    def effective_delta(self) -> torch.Tensor:
        return gate(self.log_alpha, self.training) * self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        y = self.dispatch(lora_linear, x, self._weight_fn, self.base_bias, None, None, 1.0, 0.0,
                          self.save_weight_for_backward, **self.kernel_kwargs())
        if not self.adapter_enabled:
            return y
        return y + F.linear(x, self.effective_delta().to(x.dtype))


def diff_modules(model: nn.Module) -> dict[str, DiffLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DiffLinear)}


class DiffWeights(LinearEntry):
    """The delta z ⊙ δ of one layer, dense (a loaded sparse delta is scattered once)."""

    kind = "diff_pruning"

    def __init__(self, layer: DiffLinear) -> None:
        super().__init__()
        with torch.no_grad():
            self.register_buffer("delta", (gate(layer.log_alpha, False) * layer.delta).detach().float().clone())

    def single(self, layer, x, bias):
        y = lora_linear(x, layer._weight_fn, bias, **kernel_kwargs(layer.base_layer))
        return y + F.linear(x, self.delta.to(x.dtype))

    def merged(self, w, b):
        return w + self.delta.to(w.device), b


def sparse_delta(mod: DiffLinear, keep_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, values) of the largest |z ⊙ δ| entries (eval gate), at most keep_fraction of the weight."""
    with torch.no_grad():
        v = (gate(mod.log_alpha, False) * mod.delta).flatten()
        k = min(int((v != 0).sum()), int(math.floor(keep_fraction * v.numel())))
        idx = torch.topk(v.abs(), k, sorted=False).indices.sort().values if k else v.new_zeros(0, dtype=torch.long)
        return idx.to("cpu", torch.int64), v[idx].to("cpu", torch.float32)


class DiffPruning(LinearMethod):
    name = "diff_pruning"
    layer_type = DiffLinear
    state_file = "diff_state.safetensors"

    def default_targets(self, model: nn.Module):
        return lambda: [p.rsplit(".", 1)[-1] for p in arch_spec(model, "peft.targets: auto").attention_projections]

    def make_layer(self, name: str, base: nn.Module, cfg: PeftConfig, context) -> DiffLinear:
        return DiffLinear(base, cfg.l0_weight, 1.0 - cfg.target_sparsity)

    def entry(self, layer: DiffLinear) -> DiffWeights:
        return DiffWeights(layer)

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"diff pruning on {len(names)} layers (target sparsity {cfg.target_sparsity:g})"

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        mods = list(diff_modules(model).values())
        if not mods or not mods[0].l0_weight:
            return None
        total = sum(open_probability(m.log_alpha).sum() for m in mods)
        expected = total / sum(m.log_alpha.numel() for m in mods)
        return mods[0].l0_weight * F.relu(expected - mods[0].density)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The dense training state (what resume needs); the artifact is its sparse form."""
        out = {}
        for name, mod in diff_modules(model).items():
            out[f"{PREFIX}{name}.delta"], out[f"{PREFIX}{name}.log_alpha"] = mod.delta, mod.log_alpha
        return out

    def artifact_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, mod in diff_modules(model).items():
            out[f"{PREFIX}{name}.diff_indices"], out[f"{PREFIX}{name}.diff_values"] = sparse_delta(mod, mod.density)
        return out

    def report(self, model: nn.Module) -> dict:
        state = self.artifact_state(model)
        kept = sum(v.numel() for k, v in state.items() if k.endswith(".diff_values"))
        total = sum(m.delta.numel() for m in diff_modules(model).values())
        return {"diff_sparsity": round(1.0 - kept / max(1, total), 6), "diff_nonzero": kept}

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        return {"qtrain_method": self.name, "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "target_modules": recorded_targets(cfg, list(diff_modules(model))),
                "target_sparsity": cfg.target_sparsity, "sparsity": self.report(model)["diff_sparsity"]}

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A saved (sparse) delta into an injected model: δ = the values, gates fully open."""
        dense, expected = {}, set()
        for name, mod in diff_modules(model).items():
            expected |= {f"{PREFIX}{name}.diff_indices", f"{PREFIX}{name}.diff_values"}
            idx, val = tensors.get(f"{PREFIX}{name}.diff_indices"), tensors.get(f"{PREFIX}{name}.diff_values")
            if idx is None or val is None or idx.shape != val.shape or (idx.numel() and
                                                                          int(idx.max()) >= mod.delta.numel()):
                raise CheckpointError(f"adapter has no valid diff_indices/diff_values for {name}: it was trained "
                                      "for a different model or targets")
            delta = torch.zeros(mod.delta.numel())
            delta[idx.long()] = val.float()
            dense[f"{PREFIX}{name}.delta"] = delta.view_as(mod.delta)
            dense[f"{PREFIX}{name}.log_alpha"] = torch.full_like(mod.log_alpha, OPEN, device="cpu")
        extra = sorted(set(tensors) - expected)
        if extra:
            raise CheckpointError(f"adapter tensor {extra[0]} matches no diff-pruned layer of this model")
        artifact.load_named(self.state(model), dense)

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method=self.name, targets=config["target_modules"],
                          target_sparsity=float(config.get("target_sparsity", 0.0)))
