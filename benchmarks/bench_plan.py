"""`qtrain plan`'s estimate vs the measured peak over a grid of runs.

    python -m benchmarks.bench_plan [--grid small|full] [--steps 2] [--out benchmarks/results/plan_cpu.json]

Each case trains `--steps` optimizer steps of the quickstart recipe at some size and setting, in
its own process (under torchrun for 2 ranks), through `python -m qtrain.train.memtrack`, and
sets the plan beside what was measured:
- `tracked_mib`: the tracked tensor peak (see qtrain/train/memtrack.py) -- what the plan's
  `peak` estimates on any device; `ratio` = plan / tracked;
- `rss_mib` and `runtime_mib` = peak RSS - the plan's resident tensors: the CPU runtime constant
  the planner adds to compare with summary.json's peak_memory_mib (qtrain.plan.estimate.OVERHEAD);
- on CUDA, `cuda_max_allocated_mib` (what summary.json records there), `cuda_ratio`, and
  `cuda_overhead_mib` = device memory in use at the end - max allocated: the CUDA context,
  workspaces and allocator slack, the planner's OVERHEAD["cuda"] (assumed until measured).
Not a test: nothing is asserted. Run it on a quiet machine; `--grid small` is the dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from benchmarks._results import merge_result

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "quickstart.yaml"
MIB = 2**20
# Packed rows: the plan sizes a micro-batch as micro_batch_size x max_len tokens, which packing fills.
BASE = ["logging.progress=false", "checkpoint.every_steps=0", "train.num_threads=1", "distributed.timeout_s=300",
        "data.packing=true"]
SIZES = {  # from_config overrides; the quickstart's own model is "256x4"
    "64x2": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "256x4": {},
    "512x4": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 8},
    "2048x8": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 8, "num_attention_heads": 16,
               "num_key_value_heads": 8},
}
SETTINGS = {  # name -> overrides
    "nf4-fp32": ["model.dtype=float32"],
    "nf4-fp32-ckpt": ["model.dtype=float32", "train.gradient_checkpointing=true"],
    "nf4-fp32-attention": ["model.dtype=float32", "train.gradient_checkpointing=true", "train.recompute=attention"],
    "nf4-bf16-ckpt": ["model.dtype=bfloat16", "train.gradient_checkpointing=true"],
    "bf16-base": ["model.dtype=bfloat16", "quant.method=none"],
    "nf4-fp32-8bit-accum": ["model.dtype=float32", "train.optimizer=adamw_8bit", "train.grad_accum=2"],
}
ZERO2 = ["distributed.engine=deepspeed", "distributed.deepspeed_config=configs/deepspeed/zero2.json"]


def grid(name: str, device: str) -> list[tuple[str, int, list[str]]]:
    """(case name, processes, overrides)."""
    sizes = {"small": ["64x2"], "full": ["64x2", "256x4", "512x4"]}[name]
    if device == "cuda":
        sizes = {"small": ["512x4"], "full": ["512x4", "2048x8"]}[name]
    cases = [(f"{size}/{setting}", 1, _size(size) + over) for size in sizes for setting, over in SETTINGS.items()
             if name == "full" or setting in ("nf4-fp32", "nf4-fp32-ckpt")]
    for size in sizes[-1:]:
        for setting in ("nf4-fp32", "nf4-fp32-ckpt"):
            cases.append((f"{size}/{setting}/ddp2", 2, _size(size) + SETTINGS[setting]))
            cases.append((f"{size}/{setting}/zero2x2", 2, _size(size) + SETTINGS[setting] + ZERO2))
    return cases


def _size(name: str) -> list[str]:
    return [f"model.from_config.{k}={v}" for k, v in SIZES[name].items()]


def measure(case: str, procs: int, overrides: list[str], steps: int, root: Path) -> dict:
    out = root / case.replace("/", "_")
    args = ["-m", "qtrain.train.memtrack", str(RECIPE), f"output_dir={out / 'run'}", *BASE, *overrides,
            "--out", str(out / "measured"), "--steps", str(steps)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    env = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_plan: case {case} failed:\n{proc.stderr[-3000:]}")
    (result,) = json.loads((out / "measured" / "rank-0.json").read_text())
    return result


def compare(case: str, procs: int, result: dict) -> dict:
    from qtrain.config import load_recipe
    from qtrain.plan import Target, plan_recipe
    from qtrain.plan.estimate import OVERHEAD

    device = "cuda" if result["device"].startswith("cuda") else "cpu"
    # planned with the recompute mode the measured run resolved (`train.recompute: auto` reads free memory)
    taken = [f"train.recompute={result['recompute']}"] if result.get("recompute") else []
    plan = plan_recipe(load_recipe(RECIPE, [*result["overrides"], *taken]), Target(device, procs))
    row = {"case": case, "processes": procs, "engine": plan.settings.engine.name, "phase": plan.peak_phase,
           "recompute": plan.settings.recompute if plan.settings.checkpointing else None,
           "plan_mib": round(plan.peak / MIB, 2), "tracked_mib": round(result["peak_bytes"] / MIB, 2),
           "ratio": round(plan.peak / result["peak_bytes"], 4), "rss_mib": round(result["peak_rss_bytes"] / MIB, 1)}
    if device == "cpu":
        resident = plan.comparable_peak - OVERHEAD["cpu"]
        row["runtime_mib"] = round((result["peak_rss_bytes"] - resident) / MIB, 1)
    if "cuda_max_allocated_bytes" in result:
        alloc = result["cuda_max_allocated_bytes"]
        row.update(cuda_max_allocated_mib=round(alloc / MIB, 2), cuda_ratio=round(plan.peak / alloc, 4),
                   cuda_overhead_mib=round((result["cuda_device_used_bytes"] - alloc) / MIB, 1))
    return row


def summarize(rows: list[dict]) -> dict:
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    out = {"cases": len(rows), "worst_case": worst["case"], "worst_ratio": worst["ratio"],
           "within_15_percent": all(abs(r["ratio"] - 1) <= 0.15 for r in rows),
           "median_runtime_mib": statistics.median([r["runtime_mib"] for r in rows if "runtime_mib" in r] or [0])}
    cuda = [r for r in rows if "cuda_ratio" in r]
    if cuda:
        out.update(worst_cuda_ratio=max((r["cuda_ratio"] for r in cuda), key=lambda x: abs(x - 1)),
                   median_cuda_overhead_mib=statistics.median(r["cuda_overhead_mib"] for r in cuda))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_plan", description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=("small", "full"), default="full")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file")
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, procs, overrides in grid(args.grid, device):
            rows.append(compare(case, procs, measure(case, procs, overrides, args.steps, Path(tmp))))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "cpu_count": os.cpu_count(),
              "loadavg_1m": round(os.getloadavg()[0], 2), "grid": args.grid, "steps": args.steps,
              "summary": summarize(rows), "runs": rows}
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        merge_result(args.out, f"{device}-{args.grid}", result)


if __name__ == "__main__":
    main()
