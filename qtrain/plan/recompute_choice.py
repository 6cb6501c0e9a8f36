"""`train.recompute: auto` (the default): the fastest recompute mode whose extra memory fits.

With gradient checkpointing, `full` recomputes whole decoder layers and keeps the least; `attention`,
`mlp` and `matmuls` keep more of each layer and recompute less (qtrain/peft/recompute.py), in that
order of speed. `full` already recomputes the fewest matmuls its memory allows (everything but the
FFN's output projection), so going faster means keeping activations. `auto` plans the step's peak
with each mode (qtrain.plan, the same model `qtrain plan` prints) and takes the fastest whose peak
exceeds `full`'s by at most HEADROOM_SHARE of the memory `full` leaves free on the device: a model
that fills the device gets `full`; a small model, or short sequences, on a large device keep
activations. The other part of the headroom stays for what the plan does not see (other processes,
fragmentation, the plan's own error). `full` too when the free memory or the model's plan is unknown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qtrain.errors import ConfigError
from qtrain.plan.estimate import estimate
from qtrain.plan.settings import Settings

FASTEST_FIRST = ("matmuls", "mlp", "attention", "full")
HEADROOM_SHARE = 0.5
MIB = 2**20
# Engines (qtrain.plan.engines names) that cannot run a selective mode, and why: `auto` takes `full`
# there and a recipe asking for one is refused (`refuse_selective`). Under ZeRO-3 DeepSpeed gathers
# each layer's parameters (torch.cat in its hooks) inside the checkpointed layer, and torch's
# selective recompute meets those ops in another order than the forward did ("aten.cat ... not
# found in storage"). FSDP2 replays them (tests/integration/test_sharding.py).
SELECTIVE_IMPOSSIBLE = {
    "zero3": "DeepSpeed ZeRO-3 gathers each layer's parameters inside the checkpointed layer, which "
             "selective recompute cannot replay",
}


@dataclass(frozen=True)
class RecomputeChoice:
    """The mode a run recomputes with (None: no gradient checkpointing) and one line saying why."""

    mode: str | None
    reason: str


NO_CHECKPOINTING = RecomputeChoice(None, "no gradient checkpointing")


def choose_recompute(s: Settings, available: int | None) -> RecomputeChoice:
    """`auto` for settings `s` on a device with `available` bytes free for this process (None: unknown)."""
    if s.engine.name in SELECTIVE_IMPOSSIBLE:
        return RecomputeChoice("full", f"auto: {SELECTIVE_IMPOSSIBLE[s.engine.name]}")
    if available is None:
        return RecomputeChoice("full", "auto: free memory unknown, so the least")
    base = estimate(dataclasses.replace(s, recompute="full")).needed
    headroom = available - base
    budget = HEADROOM_SHARE * headroom
    if headroom > 0:
        for mode in FASTEST_FIRST[:-1]:
            extra = estimate(dataclasses.replace(s, recompute=mode)).needed - base
            if extra <= budget:
                return RecomputeChoice(mode, f"auto: keeps {extra / MIB:,.0f} MiB more than full, within "
                                             f"{HEADROOM_SHARE:.0%} of the {headroom / MIB:,.0f} MiB free at full's "
                                             "planned peak")
    return RecomputeChoice("full", f"auto: {max(0, headroom) / MIB:,.0f} MiB free at full's planned peak leaves "
                                   "no room to keep more")


def selective_refusal(mode: str, engine: str) -> str | None:
    """Why a recipe's `mode` cannot run under `engine`, naming the fix; None when it can."""
    if mode in ("auto", "full") or engine not in SELECTIVE_IMPOSSIBLE:
        return None
    return (f"train.recompute: {mode} cannot run under {engine}: {SELECTIVE_IMPOSSIBLE[engine]}; "
            "set train.recompute: full (or auto, which picks it there)")


def refuse_selective(mode: str, engine: str) -> None:
    """ConfigError for a recipe asking for a selective `mode` under an engine that cannot run one."""
    why = selective_refusal(mode, engine)
    if why:
        raise ConfigError(why)
