"""One QLoRA training step on a GPU, Llama-3-8B shapes: qtrain vs the anchor (HF transformers + peft + bnb).

    python -m benchmarks.bench_train_step [--layers 32 --seq 2048 --batch 1 --rank 16 --steps 6 --warmup 2
                                           --sides hf,qtrain-torch,qtrain-triton,qtrain-triton-fusedce
                                           --rounds 1 --out benchmarks/results/<gpu>.json | --no-out]

The model is a random-init Llama with Llama-3-8B's shapes (hidden 4096, SwiGLU 14336, 32 heads,
8 KV heads, vocab 128256; `--layers` trims the depth, not the shapes), written once as bf16
safetensors and loaded by both sides. Each side trains it in its own fresh process (so its peak
CUDA memory is its own): NF4 double-quant base, LoRA r/2r on all 7 projections, bf16 autocast,
non-reentrant gradient checkpointing, torch AdamW, the same random packed batch.

Sides: `hf` is the anchor recipe of `_anchor.py` on the GPU (`build_anchor` itself is CPU-bound:
device_map cpu and CPU autocast, so `build_gpu_anchor` below repeats its calls with the GPU
spelled in); `qtrain-torch` / `qtrain-triton` are `train.setup.build_model` with `kernels: torch` /
`triton`, loss as the trainer computes it; `qtrain-triton-fusedce` also replaces the lm_head +
cross-entropy by `qtrain_kernels.fused_ce.fused_linear_cross_entropy` on the decoder's hidden states.
`fused_lora_calls` reports whether the fused LoRA kernels actually ran (they need the NF4 buffers
passed by the model's layers). Without CUDA the script exits with a message and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as h

REPO = h.REPO
TOKENIZER = REPO / "data" / "quickstart" / "tokenizer"
SEED, LR = 0, 1e-4
SIDES = ("hf", "qtrain-torch", "qtrain-triton", "qtrain-triton-fusedce")
NO_CUDA_EXIT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="run every side this many times, interleaved")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--cache", type=Path, default=None, help="model dir (default /tmp/qtrain_bench/llama3-8b-L<layers>)")
    p.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/<gpu>.json)")
    p.add_argument("--no-out", action="store_true")
    p.add_argument("--side", choices=("prepare",) + SIDES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sides = [s for s in args.sides.split(",") if s]
    bad = [s for s in args.sides if s not in SIDES]
    if bad or not args.sides:
        p.error(f"--sides: unknown {bad or 'nothing'}; choose from {', '.join(SIDES)}")
    return args


def llama3_8b_config(layers: int) -> dict:
    return {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": layers,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def model_dir(args: argparse.Namespace) -> Path:
    return args.cache or Path(tempfile.gettempdir()) / "qtrain_bench" / f"llama3-8b-L{args.layers}"


# ---- child side ---------------------------------------------------------------------------------

def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("bench_train_step: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured",
              file=sys.stderr)
        raise SystemExit(NO_CUDA_EXIT)


def build_gpu_anchor(base_dir: Path, rank: int, alpha: float):
    """`_anchor.build_anchor`'s calls, on the GPU: device_map to it, CUDA bf16 autocast."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from benchmarks._anchor import TARGETS

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": torch.cuda.current_device()}, local_files_only=True)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()

    def loss_fn(input_ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(input_ids=input_ids, labels=input_ids).loss

    return model, loss_fn


def build_qtrain(args: argparse.Namespace, base: Path, tmp: str, kernels: str, fused_ce: bool):
    import torch

    from qtrain.config import recipe_from_dict
    from qtrain.train.loss import causal_lm_loss_sum, count_trained_tokens
    from qtrain.train.setup import build_model, kernel_backend
    from qtrain_kernels.fused_ce import fused_linear_cross_entropy

    recipe = recipe_from_dict({
        "output_dir": tmp, "seed": SEED, "model": {"path": str(base)}, "kernels": kernels,
        "quant": {"method": "nf4", "double_quant": True},
        "peft": {"r": args.rank, "alpha": 2.0 * args.rank, "dropout": 0.0},
        "data": {"path": str(REPO / "data" / "quickstart" / "train.jsonl")},
        "train": {"gradient_checkpointing": True, "recompute": "full", "autocast": "on", "lr": LR},
    })
    model, _ = build_model(recipe, base, torch.device("cuda"))
    model.train()
    backend = kernel_backend(recipe)

    def loss_fn(input_ids):
        mask = torch.ones_like(input_ids)
        n = max(1, count_trained_tokens(input_ids))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if not fused_ce:
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            else:
                hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask).last_hidden_state
        if not fused_ce:
            return causal_lm_loss_sum(logits, input_ids) / n
        head = model.get_output_embeddings().weight
        return fused_linear_cross_entropy(hidden[:, :-1], head, input_ids[:, 1:], backend=backend) / n

    return model, loss_fn


def count_fused_calls(run) -> int:
    """Launches of the fused LoRA forward (GEMM or GEMV) during `run()`: did the fused path run?"""
    from qtrain_kernels.triton import gemv_nf4, lora_matmul

    calls = [0]
    originals = (lora_matmul.lora_forward, gemv_nf4.nf4_gemv)

    def counted(fn):
        def wrapper(*a, **k):
            calls[0] += 1
            return fn(*a, **k)
        return wrapper

    lora_matmul.lora_forward, gemv_nf4.nf4_gemv = (counted(f) for f in originals)
    try:
        run()
    finally:
        lora_matmul.lora_forward, gemv_nf4.nf4_gemv = originals
    return calls[0]


def run_side(args: argparse.Namespace) -> dict:
    import torch

    require_cuda()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(SEED)  # LoRA A init
        if args.side == "hf":
            model, loss_fn = build_gpu_anchor(model_dir(args), args.rank, 2.0 * args.rank)
        else:
            kernels = "torch" if args.side == "qtrain-torch" else "triton"
            model, loss_fn = build_qtrain(args, model_dir(args), tmp, kernels, args.side.endswith("fusedce"))
    load_s, load_peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    vocab = llama3_8b_config(args.layers)["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(SEED)).cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    times, losses, fused = [], [], None

    def step():
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if i == 0 and args.side != "hf":
            fused = count_fused_calls(step)
        else:
            step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_times": [round(t, 4) for t in times], "first_loss": round(losses[0], 5),
            "final_loss": round(losses[-1], 5), "load_s": round(load_s, 1),
            "peak_mib_load": round(load_peak / 2**20, 1),
            "peak_mib_train": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "fused_lora_calls_first_step": fused, "device": torch.cuda.get_device_name()}


def prepare_base(args: argparse.Namespace) -> Path:
    import torch

    from qtrain.models.build import write_random_base
    from qtrain.models.tokenizer import load_tokenizer

    require_cuda()  # fail before writing ~16 GB
    tok = load_tokenizer(str(TOKENIZER))
    return write_random_base(llama3_8b_config(args.layers), tok, SEED, torch.bfloat16, model_dir(args))


# ---- parent -----------------------------------------------------------------------------------

def run_child(args: argparse.Namespace, side: str) -> dict:
    argv = h.side_argv("benchmarks.bench_train_step", side, args, ("layers", "seq", "batch", "rank", "steps",
                                                                     "warmup", "cache"))
    return h.run_json(argv, f"bench_train_step: the {side!r} side")  # without CUDA the side says so and exits


def summarize(runs: list[dict], tokens: int) -> dict:
    out = h.pooled(runs, tokens, ("peak_mib_load", "peak_mib_train"),
                   ("first_loss", "final_loss", "trainable_params", "fused_lora_calls_first_step"))
    out["load_s"] = [r["load_s"] for r in runs]
    return out


def compare(args: argparse.Namespace) -> dict:
    from benchmarks._anchor import anchor_config

    run_child(args, "prepare")
    runs: dict[str, list[dict]] = {side: [] for side in args.sides}
    for _ in range(args.rounds):
        for side in args.sides:
            runs[side].append(run_child(args, side))
    tokens = args.batch * args.seq
    sides = {side: summarize(r, tokens) for side, r in runs.items()}
    hf = sides.get("hf")
    ratios = {side: {"step_time_over_hf": round(s["median_step_s"] / hf["median_step_s"], 3),
                     "peak_train_memory_over_hf": round(s["peak_mib_train"] / hf["peak_mib_train"], 3)}
              for side, s in sides.items() if hf and side != "hf"}
    anchor = anchor_config(args.rank, 2 * args.rank)
    anchor["from_pretrained"] = anchor["from_pretrained"].replace("{'': 'cpu'}", "{'': cuda device}")
    anchor["loss"] = anchor["loss"].replace("'cpu'", "'cuda'")
    return {"device": next(iter(runs.values()))[0]["device"],
            "date": h.now(),
            "config": {"model": llama3_8b_config(args.layers), "seq": args.seq, "batch": args.batch,
                       "rank": args.rank, "alpha": 2 * args.rank, "steps": args.steps, "warmup": args.warmup,
                       "rounds": args.rounds, "optimizer": f"torch AdamW lr {LR}", "autocast": "cuda bfloat16",
                       "gradient_checkpointing": "non-reentrant, full recompute (both sides)",
                       "model_dir": str(model_dir(args))},
            "anchor_config": anchor, "sides": sides, "ratios": ratios, "versions": h.versions()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "prepare":
        print(json.dumps({"model_dir": str(prepare_base(args))}))
    elif args.side:
        print(json.dumps(run_side(args)))
    else:
        result = compare(args)
        print(json.dumps(result, indent=2))
        if not args.no_out:
            import re

            from benchmarks._results import merge_result

            key = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
            merge_result(args.out or REPO / "benchmarks" / "results" / f"{key}.json", "bench_train_step", result)


if __name__ == "__main__":
    main()
