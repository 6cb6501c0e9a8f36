"""Entry points: a recipe + a target -> a Plan; the figure a run records beside its measured peak."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError, QtrainError
from qtrain.plan.estimate import Plan, estimate
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
    """The per-device memory plan of `recipe` on `target` (`engine`: --engine, else the recipe's)."""
    return estimate(settings_from_recipe(recipe, target, engine), target.capacity)


def planned_peak_mib(recipe: Recipe, base_dir: str | Path, world: int, device: str) -> float:
    """What a run's summary.json should measure as `peak_memory_mib` on this device kind (see
    `Plan.comparable_peak`), read from the base the run really loads (`base_dir`'s config.json)."""
    model = dataclasses.replace(recipe.model, path=str(base_dir), from_config=None)
    plan = plan_recipe(dataclasses.replace(recipe, model=model), Target(device, world, None))
    return round(plan.comparable_peak / 2**20, 1)


@dataclass(frozen=True)
class RunEstimate:
    """The plan's figure for a starting run, and the line its header prints."""

    peak_mib: float | None
    line: str


def run_estimate(recipe: Recipe, base_dir: str | Path, world: int, device: str) -> RunEstimate:
    """`planned_peak_mib` for a run's header and summary.json; a model the memory model does not
    cover (e.g. T5) gets None and says why, without stopping the run."""
    try:
        mib = planned_peak_mib(recipe, base_dir, world, device)
    except QtrainError as exc:
        return RunEstimate(None, f"plan: no estimate ({exc})")
    what = "tensors + process runtime, compare with peak RSS" if device == "cpu" else "max allocated"
    return RunEstimate(mib, f"plan: peak {mib:,.0f} MiB per device ({what}); summary.json records it beside "
                            "the measured peak")
