"""Entry points: a recipe + a target -> a Plan; the figure a run records beside its measured peak."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError, QtrainError
from qtrain.plan.engines import resolve_engine
from qtrain.plan.estimate import Plan, estimate
from qtrain.plan.recompute_choice import (NO_CHECKPOINTING, RecomputeChoice, choose_recompute, refuse_selective,
                                          selective_refusal)
from qtrain.plan.settings import settings_from_recipe
from qtrain.plan.target import Target, machine_memory, parse_memory


def resolve_target(device: str = "auto", gpus: int = 1, gpu_mem: str | None = None) -> Target:
    """`qtrain plan`'s flags -> a Target. `auto`: cuda when a GPU is visible or --gpu-mem is given,
    else this CPU. Capacity: --gpu-mem, else the visible GPU's memory, else (CPU) this machine's
    memory shared by the processes."""
    if gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1 (processes, one device each), got {gpus}")
    import torch

    visible = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if visible or gpu_mem is not None else "cpu"
    if gpu_mem is not None:
        capacity = parse_memory(gpu_mem, "--gpu-mem")
    elif device == "cuda" and visible:
        capacity = torch.cuda.get_device_properties(0).total_memory
    elif device == "cpu" and machine_memory():
        capacity = machine_memory() // gpus
    else:
        capacity = None
    return Target(device, gpus, capacity)


def plan_recipe(recipe: Recipe, target: Target, engine: str | None = None) -> Plan:
    """The per-device memory plan of `recipe` on `target` (`engine`: --engine, else the recipe's);
    `train.recompute: auto` resolved against the target's capacity (a run resolves it against the
    memory free when it starts), the choice in the plan's notes."""
    s = settings_from_recipe(recipe, target, engine)
    note = None
    if s.checkpointing:
        why = selective_refusal(s.recompute, s.engine.name)
        if why:
            note = f"{why} (a run refuses it)"
        elif s.recompute == "auto":
            choice = choose_recompute(s, target.capacity)
            s = dataclasses.replace(s, recompute=choice.mode)
            note = f"train.recompute: {choice.mode} ({choice.reason})"
    plan = estimate(s, target.capacity)
    if note:
        plan.notes.append(note)
    return plan


def _run_recipe(recipe: Recipe, base_dir: str | Path, recompute: str | None = None) -> Recipe:
    """`recipe` read from the base a run really loads (`base_dir`'s config.json), with the recompute
    mode it resolved (`recompute`; None: the recipe's)."""
    train = recipe.train if recompute is None else dataclasses.replace(recipe.train, recompute=recompute)
    model = dataclasses.replace(recipe.model, path=str(base_dir), from_config=None)
    return dataclasses.replace(recipe, model=model, train=train)


def check_recompute(recipe: Recipe, world: int) -> None:
    """Refuse (ConfigError) a selective `train.recompute` under an engine that cannot run one."""
    if recipe.train.gradient_checkpointing:
        refuse_selective(recipe.train.recompute, resolve_engine(recipe, world).name)


def resolve_recompute(recipe: Recipe, base_dir: str | Path, device: str, available: int | None,
                      world: int = 1) -> RecomputeChoice:
    """What a run recomputes: the recipe's mode, or for `auto` the fastest that fits in `available`
    bytes (free per process on each of `world` devices of kind `device`; see
    qtrain/plan/recompute_choice.py), planned from the base the run loads (`base_dir`). A model the
    memory model does not cover gets `full`; a selective mode under an engine that cannot run one
    is a ConfigError."""
    t = recipe.train
    if not t.gradient_checkpointing:
        return NO_CHECKPOINTING
    if t.recompute != "auto":
        check_recompute(recipe, world)
        return RecomputeChoice(t.recompute, "set in the recipe")
    try:
        settings = settings_from_recipe(_run_recipe(recipe, base_dir), Target(device, world, None))
    except QtrainError as exc:
        return RecomputeChoice("full", f"auto: no memory plan for this model ({exc}), so the least")
    return choose_recompute(settings, available)


def planned_peak_mib(recipe: Recipe, base_dir: str | Path, world: int, device: str,
                     recompute: str | None = None) -> float:
    """What a run's summary.json should measure as `peak_memory_mib` on this device kind (see
    `Plan.comparable_peak`), read from the base the run really loads (`base_dir`'s config.json),
    with the recompute mode the run resolved (`recompute`; None: the recipe's, `auto` as on an
    unknown device)."""
    plan = plan_recipe(_run_recipe(recipe, base_dir, recompute), Target(device, world, None))
    return round(plan.comparable_peak / 2**20, 1)


@dataclass(frozen=True)
class RunEstimate:
    """The plan's figure for a starting run, and the line its header prints."""

    peak_mib: float | None
    line: str


def run_estimate(recipe: Recipe, base_dir: str | Path, world: int, device: str,
                 recompute: str | None = None) -> RunEstimate:
    """`planned_peak_mib` for a run's header and summary.json (`recompute`: the mode the run resolved);
    a model the memory model does not cover (e.g. T5) gets None and says why, without stopping the run."""
    try:
        mib = planned_peak_mib(recipe, base_dir, world, device, recompute)
    except QtrainError as exc:
        return RunEstimate(None, f"plan: no estimate ({exc})")
    what = "tensors + process runtime, compare with peak RSS" if device == "cpu" else "max allocated"
    return RunEstimate(mib, f"plan: peak {mib:,.0f} MiB per device ({what}); summary.json records it beside "
                            "the measured peak")
