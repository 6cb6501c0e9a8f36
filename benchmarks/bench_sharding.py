"""Sharding the 4-bit base: per-rank NF4 bytes, peak memory and throughput, FSDP2 and ZeRO-3 vs DDP.

    python -m benchmarks.bench_sharding [--hidden 2048] [--layers 16] [--procs 1,2,4]
        [--engines ddp,fsdp,zero3] [--steps 2] [--out benchmarks/results/sharding_cpu.json]

An on-disk HF model (random-init Llama, bf16 safetensors, written once under /tmp/qtrain_bench;
hidden 2048 x 16 layers is ~1B parameters) is trained for `--steps` steps by `qtrain train` under
torchrun at each world size and engine (ddp: every rank holds the whole base; fsdp: torch FSDP2;
zero3: DeepSpeed ZeRO-3), QLoRA r=16 on all 7 projections, fp32 compute, micro-batch 1 x 256
tokens per rank, gradient checkpointing, 1 thread per rank, no eval and no checkpoints.

Per run, from the ranks' summary.json and the kernel's accounting:
  nf4_bytes_per_rank     resident 4-bit base on rank 0, from tensor storage (padding included)
  peak_rss_load_mib      rank 0's peak RSS when the model was loaded and wrapped
  peak_rss_mib_per_rank  the largest rank's lifetime peak RSS (load + train)
  tokens_per_s           all ranks together
The bars (from the issue): nf4 bytes per rank at N ranks <= 1.05 x (1 rank's) / N; peak RSS per
rank at 2 ranks <= 1 rank's - 0.4 x the NF4 model size. Results are keyed by the CPU (its name and
bf16-relevant ISA, as every benchmark's) and the model size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks import _harness as h
from benchmarks._launch import torchrun_train

REPO = h.REPO
ZERO3 = {"zero_optimization": {"stage": 3}}


def write_model(hidden: int, layers: int, intermediate: int | None = None, vocab: int = 32000) -> Path:
    """The random-init bf16 Llama dir (written once, reused after)."""
    # stdout carries only the JSON result: libraries imported here (deepspeed, through
    # transformers) attach logging handlers to stdout when they are first imported.
    with contextlib.redirect_stdout(sys.stderr):
        return _write_model(hidden, layers, intermediate, vocab)


def _write_model(hidden: int, layers: int, intermediate: int | None, vocab: int) -> Path:
    import torch

    from qtrain.models.build import write_random_base
    from qtrain.models.tokenizer import load_tokenizer

    intermediate = intermediate or hidden * 11 // 4
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
           "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 128),
           "num_key_value_heads": max(1, hidden // 128), "vocab_size": vocab, "max_position_embeddings": 512}
    out = Path(tempfile.gettempdir()) / "qtrain_bench" / f"llama-{hidden}-{layers}-{intermediate}-{vocab}"
    tokenizer = load_tokenizer(str(REPO / "data" / "quickstart" / "tokenizer"))
    return write_random_base(cfg, tokenizer, 0, torch.bfloat16, out)


def run_child(args: argparse.Namespace, engine: str, nproc: int) -> dict:
    """In a fresh process: one torchrun run, its summary and its ranks' peak RSS."""
    extra = [f"distributed.engine={'deepspeed' if engine == 'zero3' else engine}"]
    if engine == "zero3":
        config = Path(args.model_dir).parent / "zero3.json"
        config.write_text(json.dumps(ZERO3))
        extra.append(f"distributed.deepspeed_config={config}")
    summary = torchrun_train(nproc, [
        "model.from_config=null", f"model.path={args.model_dir}", "model.dtype=float32", "data.max_len=256",
        "data.eval_split=0", "train.micro_batch_size=1", "train.grad_accum=1", f"train.max_steps={args.steps}",
        "train.warmup_steps=0", "train.optimizer=adamw", "train.gradient_checkpointing=true", "train.num_threads=1",
        "logging.progress=false", "checkpoint.every_steps=0", "checkpoint.resume=never", *extra],
        f"bench_sharding: {engine} x {nproc}")
    return {"engine": engine, "procs": nproc, "nf4_bytes_per_rank": summary["nf4_bytes_per_rank"],
            "peak_rss_load_mib": summary.get("peak_memory_load_mib"),
            "peak_rss_mib_per_rank": summary["peak_rss_mib_per_rank"],
            "tokens_per_s": summary["tokens_per_s"] * summary["world_size"],
            "median_step_s": summary["median_step_s"], "final_train_loss": summary["final_train_loss"],
            "loadavg_1m": h.loadavg()}


def bars(rows: list[dict]) -> dict:
    """The issue's two bars, per sharding engine, against that engine's own 1-rank run."""
    out = {}
    for engine in sorted({r["engine"] for r in rows} - {"ddp"}):
        runs = {r["procs"]: r for r in rows if r["engine"] == engine}
        one = runs.get(1)
        if one is None:
            continue
        nf4_mib = one["nf4_bytes_per_rank"] / 2**20
        out[engine] = {
            f"nf4_bytes_{n}_ranks_ok": r["nf4_bytes_per_rank"] <= 1.05 * one["nf4_bytes_per_rank"] / n
            for n, r in runs.items() if n > 1}
        if 2 in runs:
            limit = one["peak_rss_mib_per_rank"] - 0.4 * nf4_mib
            out[engine]["peak_rss_2_ranks_ok"] = runs[2]["peak_rss_mib_per_rank"] <= limit
            out[engine]["peak_rss_2_ranks_limit_mib"] = round(limit, 1)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_sharding", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--procs", default="1,2,4", help="world sizes, comma-separated")
    p.add_argument("--engines", default="ddp,fsdp,zero3", help="ddp, fsdp, zero3, comma-separated")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "PROCS"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", dest="model_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.procs = [int(n) for n in args.procs.split(",") if n]
    args.engines = [e for e in args.engines.split(",") if e]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args, args.child[0], int(args.child[1]))))
        return
    model_dir = write_model(args.hidden, args.layers)
    rows = []
    for engine in args.engines:
        for n in args.procs:
            cmd = [sys.executable, "-m", "benchmarks.bench_sharding", "--child", engine, str(n), "--steps",
                   str(args.steps), "--model-dir", str(model_dir)]
            rows.append(h.run_json(cmd, f"bench_sharding: {engine} x {n}"))
    ddp = {r["procs"]: r for r in rows if r["engine"] == "ddp"}
    for r in rows:  # against DDP at the same world size
        base = ddp.get(r["procs"])
        r["tokens_per_s_vs_ddp"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        r["peak_rss_vs_ddp"] = round(r["peak_rss_mib_per_rank"] / base["peak_rss_mib_per_rank"], 3) if base else None
    result = {"date": h.now(), "device": h.cpu_key(1), "cpu": h.cpu_name(), "cpu_count": os.cpu_count(), "hidden": args.hidden, "layers": args.layers, "steps": args.steps,
              "model_file_mib": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20, 1),
              "runs": rows, "bars": bars(rows)}
    print(json.dumps(result, indent=2))
    if args.out:
        from benchmarks._results import merge_result

        merge_result(args.out, f"{result['device']}-{args.hidden}x{args.layers}", result)  # one entry per size


if __name__ == "__main__":
    main()
