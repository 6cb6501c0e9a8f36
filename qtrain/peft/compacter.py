"""Compacter: bottleneck adapters whose two projections are low-rank PHM layers (Mahabadi et al. 2021).

    W = Σ_{i=1..n} A_i ⊗ (L_i · R_i)      A_i: n×n "rules", shared by every adapter of the model;
                                           L_i: (in/n)×rank, R_i: rank×(out/n), per layer

so a projection costs n·rank·(in+out)/n + out parameters instead of in·out (plus the 2·n³ shared
rules). Placement, width and activation are the bottleneck method's (bottleneck.py); `phm_dim` is
n (it must divide the hidden size and the bottleneck width), `phm_rank` the rank. The up
projection's R starts at zero, so a fresh adapter is the base bit for bit.

Artifact (qtrain's own format): like bottleneck's, with `<module>.adapter_down.W_left|W_right|b`
and `.adapter_up.` the same (the adapters library's PHMLayer names) and the shared
`phm_rule_down` / `phm_rule_up` [n, n, n]; adapter_config.json adds `phm_dim`, `phm_rank`.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.peft.bottleneck import ACTIVATIONS, TRAINED, BottleneckAdapters, hidden_size
from qtrain.peft.layer import compute_dtype

RULES = "compacter_rules"


class CompacterRules(nn.Module):
    """The shared n×n×n rules of one compacter adapter (registered once, on the model)."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.phm_rule_down = nn.Parameter(torch.randn(n, n, n, device=device) * n ** -0.5)
        self.phm_rule_up = nn.Parameter(torch.randn(n, n, n, device=device) * n ** -0.5)


class PHMLinear(nn.Module):
    def __init__(self, n: int, in_features: int, out_features: int, rank: int, zero: bool,
                 device: torch.device) -> None:
        super().__init__()
        std = (in_features * rank) ** -0.25  # Σ of n Kronecker terms: entries of W have variance ~1/in
        self.W_left = nn.Parameter(torch.randn(n, in_features // n, rank, device=device) * std)
        self.W_right = nn.Parameter(torch.zeros(n, rank, out_features // n, device=device) if zero else
                                    torch.randn(n, rank, out_features // n, device=device) * std)
        self.b = nn.Parameter(torch.zeros(out_features, device=device))

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """[in, out] = Σ_i rule_i ⊗ (W_left_i · W_right_i)."""
        n, p, q = rule.shape[0], self.W_left.shape[1], self.W_right.shape[2]
        blocks = self.W_left @ self.W_right  # [n, in/n, out/n]
        return torch.einsum("iab,icd->acbd", rule, blocks).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return x @ self.weight(rule).to(x.dtype) + self.b.to(x.dtype)


class CompacterAdapter(nn.Module):
    def __init__(self, rules: CompacterRules, dim: int, width: int, n: int, rank: int, activation: str,
                 device: torch.device) -> None:
        super().__init__()
        self.activation = activation
        self.adapter_down = PHMLinear(n, dim, width, rank, False, device)
        self.adapter_up = PHMLinear(n, width, dim, rank, True, device)
        # Shared with every adapter of this compacter; registered on the model (RULES), not here.
        self.__dict__["rules"] = rules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        z = ACTIVATIONS[self.activation](self.adapter_down(x, self.rules.phm_rule_down))
        return self.adapter_up(z, self.rules.phm_rule_up)


def rules_of(model: nn.Module, name: str = TRAINED) -> CompacterRules | None:
    registry = getattr(model, RULES, None)
    return registry[name] if isinstance(registry, nn.ModuleDict) and name in registry else None


class Compacter(BottleneckAdapters):
    name = "compacter"

    def make_adapter(self, model: nn.Module, cfg: PeftConfig, adapter_name: str, device: torch.device) -> nn.Module:
        """A compacter adapter sharing the rules of `adapter_name` (created and registered on the model once)."""
        if getattr(model, RULES, None) is None:
            model.add_module(RULES, nn.ModuleDict())
        if adapter_name not in model.compacter_rules:
            model.compacter_rules[adapter_name] = CompacterRules(cfg.phm_dim, device)
        return CompacterAdapter(model.compacter_rules[adapter_name], hidden_size(model), self.width(model, cfg),
                                cfg.phm_dim, cfg.phm_rank, cfg.activation, device)

    def check(self, model: nn.Module, cfg: PeftConfig) -> None:
        hidden, width = hidden_size(model), self.width(model, cfg)
        if hidden % cfg.phm_dim or width % cfg.phm_dim:
            raise ConfigError(f"peft.phm_dim: {cfg.phm_dim} must divide the hidden size ({hidden}) and the bottleneck "
                              f"width ({width} = hidden / reduction_factor); e.g. peft.phm_dim: 4")

    def shared_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        rules = rules_of(model, name)
        return {} if rules is None else {"phm_rule_down": rules.phm_rule_down, "phm_rule_up": rules.phm_rule_up}

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {**super().state(model), **self.shared_state(model, TRAINED)}

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        return f"{super().describe(cfg, names)}, {cfg.phm_dim} Kronecker terms of rank {cfg.phm_rank}"

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        return {**super().artifact_config(model, cfg, base_model), "phm_dim": cfg.phm_dim, "phm_rank": cfg.phm_rank}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        cfg = super().config_from_artifact(config)
        cfg.phm_dim, cfg.phm_rank = int(config["phm_dim"]), int(config["phm_rank"])
        return cfg
