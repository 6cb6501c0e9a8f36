"""Peak memory of a training step as *tracked tensor allocations*: the number `qtrain plan` is checked against.

On a CPU, the process's resident set size (what `summary.json: peak_memory_mib` reports there) is a
poor yardstick for a memory model: it holds the Python runtime and libraries, and glibc keeps freed
heap resident, so it moves with allocation history rather than with what the step holds. This module
counts what the step holds: every tensor storage on one device, from the moment a dispatched op
creates it until its last reference dies.

How: a `TorchDispatchMode` sees the outputs of every op that runs while it is active (Python and
C++ callers alike, the autograd engine's backward included) and registers each new storage with a
weakref whose callback subtracts its bytes when the storage is freed; storages made before the
mode was entered (or by paths that skip the dispatcher, e.g. `torch.frombuffer`) are registered
from a scan of the live Python objects. `peak` is the largest sum of live registered bytes seen
after any op. It is torch's own `torch.distributed._tools.mem_tracker` idea, without module/optimizer
hooks. Not seen: scratch memory a kernel allocates and frees inside itself, storages resized in
place (`UntypedStorage.resize_`, used by FSDP2 to free gathered parameters), and allocator
rounding/caching -- on CUDA, `torch.cuda.max_memory_allocated` is the reference instead.

`python -m qtrain.train.memtrack RECIPE [key=value ...] --out DIR` runs a recipe's first steps
under the tracker (one process, or every rank under torchrun / the deepspeed launcher) and writes
each rank's measurement to `DIR/rank-R.json`; tests/integration/test_plan_measured.py and
benchmarks/bench_plan.py set `qtrain plan`'s estimate beside it.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages on one device type (`"cpu"` or `"cuda"`)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, t: torch.Tensor) -> None:
        """Register `t`'s storage (once); its bytes count until the storage is freed."""
        if t.device.type != self.device_type or t.is_meta:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            return
        if st in self._live:
            return
        nbytes = st.nbytes()
        self._live[st] = (nbytes, weakref.ref(st, lambda _ref, n=nbytes: self._freed(n)))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def track_live_tensors(self) -> None:
        """Register every tensor a Python object holds now (model, optimizer, engine buffers, ...)."""
        for obj in gc.get_objects():
            # type(), not isinstance(): isinstance reads `__class__`, which some lazy module
            # attributes answer with a deprecation warning.
            if issubclass(type(obj), torch.Tensor):
                self.track(obj)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def _device_counters(device) -> dict:
    """CUDA's own figures beside the tracker's: max allocated/reserved since the reset, and what the
    whole device uses now (context and other processes included), for the planner's overhead."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(device), "cuda_device_used_bytes": total - free}


def measure_training_peak(recipe, env, steps: int = 2) -> dict:
    """Build `recipe`'s session and run `steps` optimizer steps under a `StorageTracker`.

    Returns this rank's tracked bytes: `setup_bytes` held once the session is built (model,
    adapter, engine buffers; the optimizer state appears at the first step) and `peak_bytes`
    during the steps (two by default: the second runs with the optimizer state allocated, as
    every later step does); on CUDA also the allocator's counters over the same steps; and the
    recompute mode the session resolved (`train.recompute: auto`), which a plan must be given.
    """
    from qtrain.train.loop import train_step
    from qtrain.train.setup import prepare

    tracker = StorageTracker(env.device().type)
    with tracker:
        s = prepare(recipe, env)
        tracker.track_live_tensors()
        setup_bytes = tracker.current
        tracker.reset_peak()
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        t = recipe.train
        stream = s.data.train_stream(t.micro_batch_size, recipe.seed, env.rank, env.world_size)
        for _ in range(steps):
            train_step(s, [next(stream) for _ in range(t.grad_accum)])
    return {"rank": env.rank, "world_size": env.world_size, "device": str(s.device), "steps": steps,
            "setup_bytes": setup_bytes, "peak_bytes": tracker.peak, "peak_rss_bytes": _peak_rss(),
            "recompute": s.recompute.mode,
            **_device_counters(s.device)}


def _peak_rss() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def main(argv: list[str] | None = None) -> None:
    """`python -m qtrain.train.memtrack RECIPE [key=value ...] --out DIR [--steps N] [--variant "k=v k=v"]...`

    Measures the recipe (with each --variant's extra overrides in turn, in this one launch) and
    writes DIR/rank-R.json: a list of results, one per variant. Run it under torchrun or the
    deepspeed launcher for several ranks.
    """
    import argparse
    import json
    from pathlib import Path

    from qtrain.config import load_recipe
    from qtrain.distributed.collectives import process_group
    from qtrain.distributed.env import read_env

    p = argparse.ArgumentParser(prog="python -m qtrain.train.memtrack", description=main.__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", required=True, type=Path, help="directory for rank-R.json")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--variant", action="append", default=None, help="extra overrides, space-separated")
    args = p.parse_args(argv)
    env = read_env()
    variants = [v.split() for v in args.variant] if args.variant else [[]]
    results = []
    with process_group(env, load_recipe(args.recipe, args.overrides).distributed.timeout_s):
        for extra in variants:
            recipe = load_recipe(args.recipe, [*args.overrides, *extra])
            results.append({"overrides": [*args.overrides, *extra], **measure_training_peak(recipe, env, args.steps)})
            gc.collect()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank-{env.rank}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
