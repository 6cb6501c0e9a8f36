"""One QLoRA training step on CPU: qtrain vs the anchor (HF transformers + peft + bitsandbytes).

    python -m benchmarks.bench_cpu_step [--hidden 1024 --layers 8 --seq 256 --batch 2 --rank 16 --steps 8
                                         --warmup 2 --rounds 1 --threads N --out benchmarks/results/cpu.json]

Both sides train the same random-init bf16 Llama (written once to a cache dir) on the same random
packed batch: bf16 autocast forward + mean next-token CE, backward, torch AdamW (lr 1e-4),
zero_grad; NF4 double-quant base, LoRA r/2r on all 7 projections, non-reentrant gradient
checkpointing. Each side runs in its own fresh interpreter so its peak RSS is its own; this
parent process never imports torch, so it adds nothing to a child's `ru_maxrss` (on Linux a
child started by vfork+exec inherits its parent's high-water mark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks._results import merge_result

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "quickstart" / "tokenizer"
VOCAB = 8192
SEED = 0
LR = 1e-4
SIDES = ("hf", "qtrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_step", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=1, help="alternate hf/qtrain processes this many times each")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads on both sides")
    p.add_argument("--cache", type=Path, default=None, help="model dir (default /tmp/qtrain_bench/llama-H-L)")
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file, keyed by device")
    p.add_argument("--recompute", default="full,attention,matmuls",
                   help="qtrain's train.recompute modes to measure, comma-separated (each its own qtrain side)")
    p.add_argument("--side", choices=("prepare",) + SIDES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recompute = [m for m in args.recompute.split(",") if m]
    bad = [m for m in args.recompute if m not in ("full", "attention", "matmuls")]
    if bad or not args.recompute:
        p.error(f"--recompute takes full, attention, matmuls; got {bad or 'nothing'}")
    if args.hidden % 64:
        p.error(f"--hidden must be a multiple of 64 (head dim 64), got {args.hidden}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def llama_config(hidden: int, layers: int) -> dict:
    """Llama shapes: SwiGLU width 8/3·H rounded to a multiple of 64, head dim 64, MHA, vocab 8192."""
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": round(hidden * 8 / 3 / 64) * 64,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
            "vocab_size": VOCAB, "max_position_embeddings": 1024}


def model_dir(args: argparse.Namespace) -> Path:
    return args.cache or Path(tempfile.gettempdir()) / "qtrain_bench" / f"llama-{args.hidden}-{args.layers}"


# ---- memory (child side) ----------------------------------------------------------------------

def rss_mib(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (high-water mark) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    """Reset VmHWM (Linux `clear_refs` 5) so the training phase's peak can be read on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- the two sides (child) --------------------------------------------------------------------

def prepare_base(args: argparse.Namespace) -> Path:
    import torch

    from qtrain.models.build import write_random_base
    from qtrain.models.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    return write_random_base(llama_config(args.hidden, args.layers), tok, SEED, torch.bfloat16, model_dir(args))


def build_qtrain(args: argparse.Namespace, base: Path, tmp: str):
    """qtrain's own model build (`build_model`) and its trainer's loss: token sum / trained tokens."""
    import torch

    from qtrain.config import recipe_from_dict
    from qtrain.train.loss import causal_lm_loss_sum, count_trained_tokens
    from qtrain.train.setup import build_model

    recipe = recipe_from_dict({
        "output_dir": tmp, "seed": SEED,
        "model": {"path": str(base)},
        "quant": {"method": "nf4", "double_quant": True},
        "peft": {"r": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0},
        "data": {"path": str(REPO / "data" / "quickstart" / "train.jsonl")},
        "train": {"gradient_checkpointing": True, "recompute": args.recompute[0], "autocast": "on", "lr": LR,
                  "num_threads": args.threads},
    })
    model, _ = build_model(recipe, base, torch.device("cpu"))
    model.train()

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        return causal_lm_loss_sum(logits, input_ids) / max(1, count_trained_tokens(input_ids))

    return model, loss_fn


def time_steps(model, loss_fn, input_ids, warmup: int, steps: int) -> tuple[list[float], list[float], list[float]]:
    """(wall seconds and process CPU seconds of each timed step, loss of every step).

    Warm-up steps run but are not timed. CPU seconds (all threads) are reported next to wall time
    because a shared 2-core box makes wall time noisy; CPU time moves much less under contention.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    times, cpu, losses = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(input_ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu, losses


def run_side(args: argparse.Namespace) -> dict:
    """Build one side, train it, and return its raw measurements (the parent summarizes)."""
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(SEED)  # LoRA A init
        if args.side == "hf":
            from benchmarks._anchor import build_anchor

            model, loss_fn = build_anchor(model_dir(args), args.rank, 2.0 * args.rank)
        else:
            model, loss_fn = build_qtrain(args, model_dir(args), tmp)
    return measure(model, loss_fn, args, time.perf_counter() - t0)


def measure(model, loss_fn, args: argparse.Namespace, load_s: float) -> dict:
    """Train a built side on the shared random batch and return its raw measurements (the parent summarizes)."""
    import torch

    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(SEED))
    load_peak, after_load = ru_maxrss_mib(), rss_mib("VmRSS")
    hwm_reset = reset_hwm()
    load_before = os.getloadavg()[0]
    times, cpu, losses = time_steps(model, loss_fn, input_ids, args.warmup, args.steps)
    train_peak = rss_mib("VmHWM") if hwm_reset else None
    return {
        "step_times": [round(t, 4) for t in times], "cpu_times": [round(t, 4) for t in cpu],
        "peak_rss_mib": round(max(load_peak, train_peak or 0.0, ru_maxrss_mib()), 1),
        "peak_rss_load_mib": round(load_peak, 1), "rss_after_load_mib": round(after_load, 1),
        "peak_rss_train_mib": None if train_peak is None else round(train_peak, 1),
        "first_loss": round(losses[0], 5), "final_loss": round(losses[-1], 5),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_s": round(load_s, 2), "threads": torch.get_num_threads(),
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


# ---- parent ---------------------------------------------------------------------------------

def child_argv(args: argparse.Namespace, side: str, recompute: str = "full") -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.bench_cpu_step", "--side", side, "--recompute", recompute]
    for name in ("hidden", "layers", "seq", "batch", "rank", "steps", "warmup", "threads"):
        argv += [f"--{name}", str(getattr(args, name))]
    if args.cache:
        argv += ["--cache", str(args.cache)]
    return argv


def run_child(args: argparse.Namespace, side: str, recompute: str = "full") -> dict:
    proc = subprocess.run(child_argv(args, side, recompute), cwd=REPO, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_cpu_step: the {side!r} side failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], tokens_per_step: int) -> dict:
    """One side over its rounds: medians over every timed step, the worst peak, the last run's losses."""
    times = [t for r in runs for t in r["step_times"]]
    cpu = [t for r in runs for t in r["cpu_times"]]
    median = statistics.median(times)
    last = runs[-1]
    out = {"median_step_s": round(median, 4), "min_step_s": min(times), "median_cpu_s": round(statistics.median(cpu), 4),
           "tokens_per_s": round(tokens_per_step / median, 1), "step_times": times, "cpu_times": cpu}
    for key in ("peak_rss_mib", "peak_rss_load_mib", "rss_after_load_mib", "peak_rss_train_mib"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = max(values) if values else None
    for key in ("first_loss", "final_loss", "trainable_params", "threads"):
        out[key] = last[key]
    out["load_s"] = [r["load_s"] for r in runs]
    out["loadavg_1m"] = [r["loadavg_1m"] for r in runs]
    return out


def ratio(qt: dict, hf: dict, key: str) -> float | None:
    return round(qt[key] / hf[key], 3) if qt.get(key) and hf.get(key) else None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "qtrain"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def device_key(threads: int) -> str:
    name = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu-{'-'.join(name.split())}-{threads}t"


def compare(args: argparse.Namespace) -> dict:
    """Write the base once, then run hf, qtrain, hf, qtrain, ... so background load hits both sides alike."""
    from benchmarks._anchor import anchor_config

    run_child(args, "prepare")
    runs: dict[str, list[dict]] = {"hf": [], **{mode: [] for mode in args.recompute}}
    for _ in range(args.rounds):
        runs["hf"].append(run_child(args, "hf"))
        for mode in args.recompute:
            runs[mode].append(run_child(args, "qtrain", mode))
    tokens = args.batch * args.seq
    hf = summarize(runs["hf"], tokens)
    qtrain = {mode: summarize(runs[mode], tokens) for mode in args.recompute}
    ratios = {mode: {"step_time_qtrain_over_hf": ratio(qt, hf, "median_step_s"),
                     "min_step_time_qtrain_over_hf": ratio(qt, hf, "min_step_s"),
                     "cpu_time_qtrain_over_hf": ratio(qt, hf, "median_cpu_s"),
                     "peak_memory_qtrain_over_hf": ratio(qt, hf, "peak_rss_mib"),
                     "train_phase_peak_memory_qtrain_over_hf": ratio(qt, hf, "peak_rss_train_mib")}
              for mode, qt in qtrain.items()}
    return {
        "device": device_key(args.threads),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": llama_config(args.hidden, args.layers), "seq": args.seq, "batch": args.batch,
                   "rank": args.rank, "alpha": 2 * args.rank, "steps": args.steps, "warmup": args.warmup,
                   "rounds": args.rounds, "threads": args.threads, "lr": LR, "autocast": "bfloat16",
                   "gradient_checkpointing": "non-reentrant (anchor: full recompute; qtrain: per train.recompute)",
                   "model_dir": str(model_dir(args)),
                   "qtrain": "train.setup.build_model(recipe); loss = causal_lm_loss_sum / count_trained_tokens, "
                             "forward under autocast with an all-ones attention_mask, as train/loop.py does"},
        "anchor_config": anchor_config(args.rank, 2 * args.rank),
        "hf": hf,
        "qtrain_by_recompute": qtrain,
        "ratios_by_recompute": ratios,
        "versions": versions(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "prepare":
        print(json.dumps({"model_dir": str(prepare_base(args))}))
    elif args.side:
        print(json.dumps(run_side(args)))
    else:
        result = compare(args)
        print(json.dumps(result, indent=2))
        if args.out:
            merge_result(args.out, result["device"], result)


if __name__ == "__main__":
    main()
