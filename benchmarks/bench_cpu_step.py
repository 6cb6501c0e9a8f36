"""One QLoRA training step on CPU: qtrain vs the anchor (HF transformers + peft + bitsandbytes).

    python -m benchmarks.bench_cpu_step [--hidden 1024 --layers 8 --seq 256 --batch 2 --rank 16 --steps 8
                                         --warmup 2 --rounds 1 --threads N --dtype auto --checkpointing both
                                         --paired-steps 0 [--aa]
                                         --recompute auto,full,mlp,attention,matmuls --out benchmarks/results/cpu.json]

Both sides train the same random-init Llama (written once, bf16 safetensors, to a cache dir) on the
same random packed batch: forward + mean next-token CE, backward, torch AdamW (lr 1e-4), zero_grad;
NF4 double-quant base, LoRA r/2r on all 7 projections. `--dtype auto` computes in what qtrain's
`model.dtype: auto` picks on this CPU (fp32 without AVX-512 BF16/AMX, else bf16 autocast), on both
sides. `--checkpointing` measures with non-reentrant gradient checkpointing (the anchor recomputes
whole layers, qtrain once per `--recompute` mode), without it, or both. `auto` is resolved as `qtrain train`
resolves it (qtrain/plan/recompute_choice.py, from this machine's free memory); the side records the mode
it took and why.

With `--paired-steps N` each qtrain variant is also timed against the anchor in lock step: both
sides' processes alive at once, taking single steps in turn N times (benchmarks/_harness.lockstep).
On a shared VM whose speed drifts by ±10% over a minute, the median of those per-pair ratios is the
steadier time ratio, and each side still runs with its own process settings (qtrain's allocator
serves qtrain only). `--aa` also pairs the anchor against itself the same way, a check of the
pairing: its median pair ratio should be ~1.

Beside the qtrain/anchor ratios, each side reports its achieved GFLOP/s: the model's FLOPs per step
(forward + backward of a frozen base with LoRA; recomputation not counted, so it is useful work)
over its median step time, against this machine's measured GEMM peak in the same dtype and threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as h
from benchmarks._results import merge_result

TOKENIZER = h.REPO / "data" / "quickstart" / "tokenizer"
VOCAB = 8192
SEED = 0
LR = 1e-4
MODES = ("auto", "full", "mlp", "attention", "matmuls")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_step", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=1, help="alternate the sides' processes this many times each")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads on every side")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="compute dtype of both sides (auto: what qtrain's model.dtype: auto picks here)")
    p.add_argument("--checkpointing", default="both", choices=("both", "on", "off"))
    p.add_argument("--recompute", default=",".join(MODES),
                   help="qtrain's train.recompute modes to measure with checkpointing, comma-separated")
    p.add_argument("--paired-steps", type=int, default=0,
                   help="also time each qtrain variant against the anchor in lock step: both processes alive, "
                        "taking single steps in turn this many times (both see the same machine moment)")
    p.add_argument("--aa", action="store_true",
                   help="with --paired-steps, also pair the anchor against itself (an A/A check of the pairing: "
                        "its median pair ratio should be ~1)")
    p.add_argument("--cache", type=Path, default=None, help="model dir (default /tmp/qtrain_bench/llama-H-L)")
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file, keyed by device")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recompute = [m for m in args.recompute.split(",") if m]
    if any(m not in MODES for m in args.recompute) or not args.recompute:
        p.error(f"--recompute takes {', '.join(MODES)}; got {args.recompute or 'nothing'}")
    if args.hidden % 64:
        p.error(f"--hidden must be a multiple of 64 (head dim 64), got {args.hidden}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.paired_steps < 0:
        p.error("--steps and --rounds must be >= 1, --warmup and --paired-steps >= 0")
    if args.aa and not args.paired_steps:
        p.error("--aa pairs the anchor against itself for --paired-steps steps: give --paired-steps N")
    return args


def llama_config(hidden: int, layers: int) -> dict:
    """Llama shapes: SwiGLU width 8/3·H rounded to a multiple of 64, head dim 64, MHA, vocab 8192."""
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": round(hidden * 8 / 3 / 64) * 64,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
            "vocab_size": VOCAB, "max_position_embeddings": 1024}


def model_dir(args: argparse.Namespace) -> Path:
    return args.cache or Path(tempfile.gettempdir()) / "qtrain_bench" / f"llama-{args.hidden}-{args.layers}"


def step_flops(cfg: dict, batch: int, seq: int, rank: int) -> float:
    """Model FLOPs of one step with a frozen base and LoRA on the 7 projections (no recomputation).

    Frozen linears: forward x·Wᵀ and backward dx = g·W, 2 FLOPs per MAC each (no weight gradient).
    LoRA: forward x·Aᵀ, (xA)·Bᵀ; backward dx, dA, dB (~3x forward). Attention scores and the weighted
    sum: 4·T·S·H forward per layer, twice that backward. lm_head: forward + dx.
    """
    h, i, n_layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    tokens = batch * seq
    shapes = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]  # q k v o gate up down (MHA)
    base = sum(a * b for a, b in shapes)
    lora = sum(rank * (a + b) for a, b in shapes)
    per_layer = 2 * tokens * (2 * base + 4 * lora) + 3 * 4 * tokens * seq * h
    head = 2 * 2 * tokens * h * vocab
    return float(n_layers * per_layer + head)


# ---- sides (child processes) ---------------------------------------------------------------------

def compute_dtype(name: str) -> str:
    import torch

    from qtrain.models.precision import resolve_precision

    return str(resolve_precision(name, torch.device("cpu")).dtype).replace("torch.", "")


def prepare_base(args: argparse.Namespace) -> dict:
    import torch

    from qtrain.models.build import write_random_base
    from qtrain.models.tokenizer import load_tokenizer

    write_random_base(llama_config(args.hidden, args.layers), load_tokenizer(str(TOKENIZER)), SEED, torch.bfloat16,
                      model_dir(args))
    return {"model_dir": str(model_dir(args)), "dtype": compute_dtype(args.dtype)}


def gemm_peak(args: argparse.Namespace) -> dict:
    """This machine's GEMM GFLOP/s at 2048^3 in the benchmark's dtype and thread count (median of 10)."""
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, compute_dtype(args.dtype))
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    times = []
    for i in range(12):
        t0 = time.perf_counter()
        a @ b
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"gemm_gflops": round(2 * n ** 3 / statistics.median(times) / 1e9, 1), "n": n, "dtype": str(dtype)}


def build_qtrain(args: argparse.Namespace, base: Path, tmp: str, checkpointing: bool, mode: str):
    """qtrain's own model build (`build_model`) and its trainer's loss (`train.loss.loss_sum`: the fused
    linear + cross-entropy where `fused_ce_backend` picks it) over the trained tokens."""
    import contextlib

    import torch

    from qtrain.config import recipe_from_dict
    from qtrain.plan.planner import resolve_recompute
    from qtrain.plan.target import available_memory
    from qtrain.train.host_memory import choose_host_allocator, fix_mmap_threshold
    from qtrain.train.loss import count_trained_tokens, loss_sum
    from qtrain.train.setup import build_model, fused_ce_backend

    recipe = recipe_from_dict({
        "output_dir": tmp, "seed": SEED, "model": {"path": str(base), "dtype": args.dtype},
        "quant": {"method": "nf4", "double_quant": True},
        "peft": {"r": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0},
        # the step's shape, which `train.recompute: auto` plans with
        "data": {"path": str(h.REPO / "data" / "quickstart" / "train.jsonl"), "max_len": args.seq},
        "train": {"gradient_checkpointing": checkpointing, "recompute": mode, "lr": LR, "num_threads": args.threads,
                  "micro_batch_size": args.batch},
    })
    # As `qtrain train` does before loading (train/setup.prepare): glibc's mmap threshold and the host allocator
    # train.host_allocator picks (auto: the caching one on a CPU; build_model gives loading's blocks back).
    fix_mmap_threshold()
    choose_host_allocator(recipe.train.host_allocator, torch.device("cpu"))
    cpu = torch.device("cpu")
    recompute = resolve_recompute(recipe, base, "cpu", available_memory(cpu))  # `auto` as `qtrain train` resolves it
    model, _ = build_model(recipe, base, cpu, recompute=recompute.mode)
    model.train()
    dtype = getattr(torch, compute_dtype(args.dtype))
    fused = fused_ce_backend(recipe, model, engine_owns_forward=False)

    def amp():
        return torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
        return loss_sum(model, batch, fused, amp) / max(1, count_trained_tokens(input_ids))

    return model, loss_fn, {"recompute": recompute.mode, "recompute_reason": recompute.reason}


def stepper(model, loss_fn, input_ids):
    """One training step of a side as a function returning its loss: forward, backward, AdamW, zero_grad."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step() -> float:
        loss = loss_fn(input_ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_steps(model, loss_fn, input_ids, warmup: int, steps: int) -> tuple[list[float], list[float], list[float]]:
    """(wall seconds and process CPU seconds of each timed step, loss of every step)."""
    step = stepper(model, loss_fn, input_ids)
    times, cpu, losses = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return times, cpu, losses


def build_side(args: argparse.Namespace, side: str, mode: str, tmp: str):
    """(model, loss_fn, what the side resolved) of one side: "hf" or "qtrain", `mode` = off | a recompute mode."""
    import torch

    checkpointing = mode != "off"
    torch.manual_seed(SEED)  # LoRA A init
    if side == "hf":
        from benchmarks._anchor import build_anchor

        return (*build_anchor(model_dir(args), args.rank, 2.0 * args.rank, compute_dtype(args.dtype), checkpointing),
                {})
    return build_qtrain(args, model_dir(args), tmp, checkpointing, mode if checkpointing else "full")


def run_side(args: argparse.Namespace) -> dict:
    """Build one side ("hf" or "qtrain", `--mode` = off | a recompute mode), train it, report raw figures."""
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, loss_fn, resolved = build_side(args, args.side, args.mode, tmp)
    return {**measure(model, loss_fn, args, time.perf_counter() - t0), **resolved}


def serve_side(args: argparse.Namespace) -> None:
    """Build one side (`--side`, `--mode`) and serve single steps on the shared batch to the parent's
    `lockstep` (benchmarks/_harness.py): the paired timing, each side in its own process."""
    import torch

    torch.set_num_threads(args.threads)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(SEED))
    with tempfile.TemporaryDirectory() as tmp:
        model, loss_fn, _ = build_side(args, args.side, args.mode, tmp)
    h.serve_steps(stepper(model, loss_fn, input_ids))


def measure(model, loss_fn, args: argparse.Namespace, load_s: float) -> dict:
    """Train a built side on the shared random batch and return its raw measurements (the parent summarizes)."""
    import torch

    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(SEED))
    load_peak, after_load = h.ru_maxrss_mib(), h.rss_mib("VmRSS")
    hwm_reset = h.reset_hwm()
    load_before = h.loadavg()
    times, cpu, losses = time_steps(model, loss_fn, input_ids, args.warmup, args.steps)
    train_peak = h.rss_mib("VmHWM") if hwm_reset else None
    return {
        "step_times": [round(t, 4) for t in times], "cpu_times": [round(t, 4) for t in cpu],
        "peak_rss_mib": round(max(load_peak, train_peak or 0.0, h.ru_maxrss_mib()), 1),
        "peak_rss_load_mib": round(load_peak, 1), "rss_after_load_mib": round(after_load, 1),
        "peak_rss_train_mib": None if train_peak is None else round(train_peak, 1),
        "first_loss": round(losses[0], 5), "final_loss": round(losses[-1], 5),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_s": round(load_s, 2), "threads": torch.get_num_threads(),
        "loadavg_1m": [load_before, h.loadavg()],
    }


# ---- parent ---------------------------------------------------------------------------------------

ARGS = ("hidden", "layers", "seq", "batch", "rank", "steps", "warmup", "threads", "dtype", "cache", "paired_steps")
PEAKS = ("peak_rss_mib", "peak_rss_load_mib", "rss_after_load_mib", "peak_rss_train_mib")
LAST = ("first_loss", "final_loss", "trainable_params", "threads", "recompute", "recompute_reason")


def variants(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(name, side, mode) of every measured variant: the anchor and qtrain, with and/or without checkpointing."""
    out = []
    if args.checkpointing in ("both", "on"):
        out += [("hf", "hf", "full")] + [(f"qtrain-{m}", "qtrain", m) for m in args.recompute]
    if args.checkpointing in ("both", "off"):
        out += [("hf-nockpt", "hf", "off"), ("qtrain-nockpt", "qtrain", "off")]
    return out


def lock_step(args: argparse.Namespace, first: tuple[str, str], second: tuple[str, str]) -> dict:
    """Two serving sides, (side, mode) each, timed in lock step: every step's time, the median of the
    per-pair ratios first/second, and each side's median step."""
    argvs = {f"{who}-{i}" if first == second else who:
             h.side_argv("benchmarks.bench_cpu_step", who, args, ARGS, mode=mode) + ["--serve"]
             for i, (who, mode) in enumerate((first, second))}
    times = h.lockstep(argvs, args.paired_steps, args.warmup)
    a, b = times.values()
    return {"step_times": times, "median_pair_ratio": round(statistics.median(x / y for x, y in zip(a, b)), 3),
            "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()}}


def compare(args: argparse.Namespace) -> dict:
    from benchmarks._anchor import anchor_config

    prep = h.run_json(h.side_argv("benchmarks.bench_cpu_step", "prepare", args, ARGS), "writing the base")
    gemm = h.run_json(h.side_argv("benchmarks.bench_cpu_step", "gemm", args, ARGS), "the GEMM peak")
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants(args)}
    for _ in range(args.rounds):
        for name, side, mode in variants(args):
            argv = h.side_argv("benchmarks.bench_cpu_step", side, args, ARGS, mode=mode)
            runs[name].append(h.run_json(argv, f"the {name!r} side"))
    tokens = args.batch * args.seq
    flops = step_flops(llama_config(args.hidden, args.layers), args.batch, args.seq, args.rank)
    sides = {name: h.pooled(r, tokens, PEAKS, LAST) for name, r in runs.items()}
    for s in sides.values():
        s["gflops"] = round(flops / s["median_step_s"] / 1e9, 1)
        s["fraction_of_gemm_peak"] = round(s["gflops"] / gemm["gemm_gflops"], 3)
    ratios = {name: {"step_time_qtrain_over_hf": h.ratio(s, sides[anchor], "median_step_s"),
                     "min_step_time_qtrain_over_hf": h.ratio(s, sides[anchor], "min_step_s"),
                     "cpu_time_qtrain_over_hf": h.ratio(s, sides[anchor], "median_cpu_s"),
                     "peak_memory_qtrain_over_hf": h.ratio(s, sides[anchor], "peak_rss_mib"),
                     "train_phase_peak_memory_qtrain_over_hf": h.ratio(s, sides[anchor], "peak_rss_train_mib")}
              for name, s in sides.items() if name.startswith("qtrain")
              for anchor in ["hf-nockpt" if name == "qtrain-nockpt" else "hf"] if anchor in sides}
    paired = {}
    if args.paired_steps:
        for name, side, mode in variants(args):
            if side == "qtrain":
                paired[name] = lock_step(args, ("qtrain", mode), ("hf", "off" if mode == "off" else "full"))
                ratios[name]["paired_step_time_qtrain_over_hf"] = paired[name]["median_pair_ratio"]
            elif args.aa:
                paired[f"{name}-vs-itself"] = lock_step(args, ("hf", mode), ("hf", mode))
    return {
        "device": h.cpu_key(args.threads), "cpu": h.cpu_name(), "cpu_flags": h.cpu_flags(), "date": h.now(),
        "config": {"model": llama_config(args.hidden, args.layers), "seq": args.seq, "batch": args.batch,
                   "rank": args.rank, "alpha": 2 * args.rank, "steps": args.steps, "warmup": args.warmup,
                   "rounds": args.rounds, "threads": args.threads, "lr": LR, "dtype": args.dtype,
                   "compute_dtype": prep["dtype"], "model_dir": prep["model_dir"],
                   "gradient_checkpointing": "non-reentrant (anchor: full recompute; qtrain: per train.recompute)",
                   "model_flops_per_step": flops,
                   "paired": "both sides' processes alive at once, one step each in turn (who goes first alternates), "
                             "after --warmup steps each; median of the per-pair ratios",
                   "qtrain": "train.setup.build_model(recipe) after train.host_memory.fix_mmap_threshold() and "
                             "choose_host_allocator (train.host_allocator: auto, the caching allocator on a CPU), "
                             "loading's cached blocks released after (as qtrain train); loss = train.loss.loss_sum "
                             "(fused linear + cross-entropy, as train.setup.fused_ce_backend picks for this plain "
                             "single-process run) / count_trained_tokens, forward with an all-ones attention_mask, as train/loop.py does"},
        "gemm_peak": gemm,
        "anchor_config": anchor_config(args.rank, 2 * args.rank, prep["dtype"]),
        "sides": sides,
        "paired": paired,
        "ratios": ratios,
        "versions": h.versions(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "prepare":
        print(json.dumps(prepare_base(args)))
    elif args.side == "gemm":
        print(json.dumps(gemm_peak(args)))
    elif args.side and args.serve:
        serve_side(args)
    elif args.side:
        print(json.dumps(run_side(args)))
    else:
        result = compare(args)
        print(json.dumps(result, indent=2))
        if args.out:
            merge_result(args.out, result["device"], result)


if __name__ == "__main__":
    main()
