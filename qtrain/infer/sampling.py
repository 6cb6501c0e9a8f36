"""Next-token choice from logits: greedy (temperature 0) or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qtrain.errors import ConfigError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> "SamplingConfig":
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"--temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p: must be in (0, 1], got {self.top_p}")
        if problems:
            raise ConfigError(problems, "generation options")
        return self


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches `top_p` (per row).

    The most likely token is always kept, so a row never ends up with nothing to sample.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token: a token is kept while that mass is still below top_p.
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[batch, vocab] logits → [batch] token ids. Sampling runs in fp32 and draws from `generator`."""
    logits = logits.float()
    if cfg.temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(top_p_filter(logits / cfg.temperature, cfg.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
