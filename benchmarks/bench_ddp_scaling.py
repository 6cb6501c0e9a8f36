"""Data-parallel scaling: tokens/s and peak memory per rank, 1 process vs N processes (DDP).

    python -m benchmarks.bench_ddp_scaling [--procs 1,2] [--threads 1] [--out benchmarks/results/ddp_cpu.json]

Each configuration trains the same recipe (a random-init Llama, QLoRA r=16 on all 7 projections,
packed sequences) with `qtrain train` under torchrun, every rank on `--threads` threads, so on a
CPU box N processes use N x threads cores. Throughput is global (every rank's tokens, from
summary.json's per-rank tokens/s x world size; ranks are symmetric); memory is the peak RSS of the
largest rank. Scaling efficiency = tokens/s(N) / (N x tokens/s(1)). On GPUs, run the same script
on a node: each rank takes one GPU and `--threads` only sets its CPU threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import _harness as h

REPO = h.REPO
MODEL = ["model.from_config.hidden_size=512", "model.from_config.intermediate_size=1376",
         "model.from_config.num_hidden_layers=4", "model.from_config.num_attention_heads=8",
         "model.from_config.num_key_value_heads=8", "data.max_len=256", "train.micro_batch_size=2",
         "train.grad_accum=2", "train.gradient_checkpointing=true", "logging.progress=false",
         "checkpoint.every_steps=0", "checkpoint.resume=never", "train.eval_batches=1"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_ddp_scaling", description=__doc__.splitlines()[0])
    p.add_argument("--procs", default="1,2", help="process counts to compare, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.procs = [int(n) for n in args.procs.split(",") if n]
    return args


def run_child(args: argparse.Namespace, nproc: int) -> dict:
    """In a fresh process: launch torchrun and report its ranks' peak RSS (RUSAGE_CHILDREN)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "qtrain", "train", "configs/quickstart.yaml", f"output_dir={out}", *MODEL,
               f"train.max_steps={args.steps}", f"train.num_threads={args.threads}"]
        env = {k: v for k, v in os.environ.items() if k != "QTRAIN_FAULT"}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_ddp_scaling: {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over all descendants
    return {"procs": nproc, "threads_per_rank": args.threads, "world_size": summary["world_size"],
            "global_batch_size": summary["global_batch_size"], "median_step_s": summary["median_step_s"],
            "tokens_per_s": summary["tokens_per_s"] * summary["world_size"],
            "peak_rss_mib_per_rank": round(peak_kib / 1024, 1), "final_train_loss": summary["final_train_loss"],
            "loadavg_1m": h.loadavg()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_child(args, args.child)))
        return
    rows = []
    for n in args.procs:
        cmd = [sys.executable, "-m", "benchmarks.bench_ddp_scaling", "--child", str(n), "--threads",
               str(args.threads), "--steps", str(args.steps)]
        rows.append(h.run_json(cmd, f"bench_ddp_scaling: {n} process(es)"))
    base = next((r for r in rows if r["procs"] == 1), None)
    for r in rows:
        r["scaling_efficiency"] = round(r["tokens_per_s"] / (r["procs"] * base["tokens_per_s"]), 3) if base else None
    result = {"date": h.now(), "device": h.cpu_key(args.threads), "cpu": h.cpu_name(), "cpu_count": os.cpu_count(),
              "model": MODEL, "steps": args.steps, "runs": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
