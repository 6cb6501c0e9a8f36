"""Shared by the per-method tests: tiny settings per method, and moving an adapter off its init.

Every method's identity init (B = 0, scales = 1, deltas = 0) makes a fresh adapter a no-op; the
oracle and round-trip checks perturb every trainable tensor first, so they compare something.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.config.schema import PeftConfig

# Small, valid settings for the tiny test models (hidden 64, 2 layers).
TINY_PEFT: dict[str, dict] = {
    "lora": {"r": 4, "alpha": 8},
    "dora": {"r": 4, "alpha": 8},
    "ia3": {},
    "bitfit": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3, "prefix_hidden_size": 16},
    "bottleneck": {"reduction_factor": 8, "placement": "houlsby"},
    "compacter": {"reduction_factor": 8, "phm_dim": 4, "placement": "parallel"},
    "freeze": {"layers_to_train": 1},
    "diff_pruning": {"target_sparsity": 0.0},  # nothing pruned: the artifact round trip is exact
    "full": {},
}


def peft_config(method: str, **extra) -> PeftConfig:
    return PeftConfig(method=method, **{**TINY_PEFT[method], **extra})


def perturb(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Add seeded noise to every trainable tensor of `model`, in parameter order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
