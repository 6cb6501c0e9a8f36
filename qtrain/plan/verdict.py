"""Where a plan does not fit: the nearest settings that do, each as the override or flag that makes it.

Each axis proposes its changes mildest first; an axis contributes its mildest change that fits.
When no single change fits, the smallest combination of axes that does is proposed (two, then
three axes, in the same cheapest-in-throughput-first order; each but the last at its strongest). Every proposal is the same `Settings` change a run would get
from the override or flag shown, so the planner's numbers are the run's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from qtrain.plan import components as comp
from qtrain.plan.engines import ENGINES
from qtrain.plan.estimate import Plan, estimate
from qtrain.plan.settings import Settings

MAX_WORLD = 64
MIN_MAX_LEN = 256


@dataclass(frozen=True)
class Suggestion:
    change: str
    overrides: tuple[str, ...] = ()   # recipe keys, as `qtrain train RECIPE key=value`
    flags: tuple[str, ...] = ()       # `qtrain plan` flags (process count, engine)
    needed: int = 0
    runnable: bool = True             # False for an engine this qtrain cannot run yet

    def command_line(self) -> str:
        return " ".join((*self.overrides, *self.flags))


Option = tuple[str, tuple[str, ...], tuple[str, ...], Settings]


def _deepspeed_bucket(s: Settings) -> Iterator[Option]:
    adapter = sum(s.trainable)
    if s.engine.reduce_bucket_elems > 4 * adapter:
        size = max(10**6, math.ceil(adapter / 10**6) * 10**6)
        smaller = replace(s, engine=replace(s.engine, reduce_bucket_elems=size))
        yield (f"set zero_optimization.reduce_bucket_size: {size} in the DeepSpeed JSON (the reduce bucket "
               f"then holds the adapter's {adapter:,} gradients instead of {s.engine.reduce_bucket_elems:,})",
               (), (), smaller)


def _fused_kernels(s: Settings) -> Iterator[Option]:
    if not s.fused_lora and s.device == "cuda" and s.method == "lora":
        yield "fused NF4 LoRA kernels (W never dequantized whole)", ("kernels=triton",), (), replace(s, fused_lora=True)


def _optimizer(s: Settings) -> Iterator[Option]:
    paged_ok = s.device == "cuda" and not s.engine.optimizer_sees_flat
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        if name != s.optimizer and comp.optimizer_state(replace(s, optimizer=name)) < comp.optimizer_state(s):
            if name.startswith("paged") and not paged_ok:
                continue
            yield f"optimizer {name}", (f"train.optimizer={name}",), (), replace(s, optimizer=name)


def _checkpointing(s: Settings) -> Iterator[Option]:
    if not s.checkpointing:
        yield "gradient checkpointing", ("train.gradient_checkpointing=true", "train.recompute=full"), (), replace(
            s, checkpointing=True, recompute="full")
    elif s.recompute != "full":
        yield "recompute whole layers", ("train.recompute=full",), (), replace(s, recompute="full")


def _micro_batch(s: Settings) -> Iterator[Option]:
    mb = s.micro_batch // 2
    while mb >= 1:
        if s.micro_batch % mb == 0:
            ga = s.grad_accum * s.micro_batch // mb
            yield (f"micro-batch {mb} x {ga} accumulation steps (same global batch)",
                   (f"train.micro_batch_size={mb}", f"train.grad_accum={ga}"), (),
                   replace(s, micro_batch=mb, grad_accum=ga))
        mb //= 2


def _sharding(s: Settings) -> Iterator[Option]:
    if s.world > 1 and not s.engine.shards_base:
        for name in ("fsdp", "zero3"):
            yield f"shard the base over the {s.world} ranks ({name})", (), (f"--engine {name}",), replace(
                s, engine=ENGINES[name], fused_ce=False)


def _world(s: Settings) -> Iterator[Option]:
    engine = s.engine if s.engine.shards_base else ENGINES["fsdp"]
    world = s.world * 2
    while world <= MAX_WORLD:
        yield (f"{world} devices with {engine.name}", (), (f"--gpus {world}", f"--engine {engine.name}"),
               replace(s, world=world, engine=engine, fused_ce=False))
        world *= 2


def _max_len(s: Settings) -> Iterator[Option]:
    n = s.max_len // 2
    while n >= MIN_MAX_LEN:
        yield f"max_len {n} (longer rows are truncated or dropped)", (f"data.max_len={n}",), (), replace(s, max_len=n)
        n //= 2


# Mildest first: what costs least throughput or quality comes first.
AXES: tuple[Callable[[Settings], Iterator[Option]], ...] = (
    _deepspeed_bucket, _fused_kernels, _optimizer, _checkpointing, _micro_batch, _sharding, _world, _max_len)


def _suggestion(option: Option, capacity: int) -> Suggestion | None:
    text, overrides, flags, settings = option
    plan = estimate(settings, capacity)
    if not plan.fits:
        return None
    return Suggestion(text, overrides, flags, plan.needed, settings.engine.landed)


def suggestions(plan: Plan, limit: int = 5) -> list[Suggestion]:
    """The mildest fitting change per axis; if none fits alone, the smallest stack of axes that does."""
    if plan.capacity is None or plan.fits:
        return []
    found = []
    for axis in AXES:
        for option in axis(plan.settings):
            hit = _suggestion(option, plan.capacity)
            if hit is not None:
                found.append(hit)
                break
    return found[:limit] if found else _stacked(plan)


def _stack(plan: Plan, axes: tuple) -> Suggestion | None:
    """Each axis' strongest change in turn, the last one's mildest change that then fits."""
    s, texts, overrides, flags = plan.settings, [], [], {}
    for k, axis in enumerate(axes):
        options = list(axis(s))
        if k == len(axes) - 1:
            options = [o for o in options if estimate(o[3], plan.capacity).fits][:1]
        if not options:
            return None
        text, ov, fl, s = options[-1]
        texts.append(text)
        overrides.extend(ov)
        flags.update({f.split()[0]: f for f in fl})  # a later axis' --gpus/--engine wins
    return Suggestion(" + ".join(texts), tuple(overrides), tuple(flags.values()), estimate(s, plan.capacity).needed,
                      s.engine.landed)


def _stacked(plan: Plan, most: int = 3) -> list[Suggestion]:
    """The smallest combination of axes (two, then three) that fits, axes in their mild-first order."""
    for size in range(2, most + 1):
        for axes in itertools.combinations(AXES, size):
            found = _stack(plan, axes)
            if found is not None:
                return [found]
    return []
