"""One training step per fine-tuning method on CPU: qtrain vs peft's implementation of the same method.

    python -m benchmarks.bench_methods [--hidden 512 --layers 4 --seq 256 --batch 4 --steps 6 --warmup 2
                                        --rounds 1 --threads N --methods lora,dora,... --out FILE]

Every side trains the same random-init Llama (written once, bf16 safetensors, loaded in fp32) on the
same random batch: NF4 double-quant base (full fine-tuning: unquantized), fp32 compute (a CPU without
native bf16 runs bf16 matmuls ~30x slower), no gradient checkpointing (peft refuses it for prefix
tuning), mean next-token cross-entropy, torch AdamW, zero_grad. qtrain builds each method with
`train.setup.build_model` and takes the loss through its sequence hook (`batch_logits`), as the
trainer does; peft gets the bitsandbytes 4-bit base from `from_pretrained` and `get_peft_model`
with the same settings, loss `model(input_ids, labels=input_ids).loss`. Methods peft lacks
(bottleneck, compacter, freeze, diff pruning, full) run on the qtrain side only and report their
step time relative to qtrain's LoRA. Each side runs in its own interpreter (peak RSS is its own);
the step loop and memory readings are bench_cpu_step's.

Bar (issue 13): no method slower than peft's implementation of it by more than 10 %
(`step_time_qtrain_over_peft` <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as h
from benchmarks._results import merge_result
from benchmarks.bench_cpu_step import PEAKS, TOKENIZER, llama_config, measure

REPO = h.REPO
SEED = 0
ALL = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit", "bottleneck", "compacter", "freeze",
       "diff_pruning", "full"]
PEFT_HAS = ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "bitfit")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, VIRTUAL = 16, 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_methods", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=1, help="alternate peft/qtrain processes this many times each")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--methods", default=",".join(ALL), help="comma-separated, from: " + ", ".join(ALL))
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file, keyed by device")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # prepare | qtrain:METHOD | peft:METHOD
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in ALL]
    if bad or not args.methods:
        p.error(f"--methods takes {', '.join(ALL)}; got {bad or 'nothing'}")
    if args.hidden % 64:
        p.error(f"--hidden must be a multiple of 64 (head dim 64), got {args.hidden}")
    return args


def model_dir(args: argparse.Namespace) -> Path:
    return Path(tempfile.gettempdir()) / "qtrain_bench" / f"methods-llama-{args.hidden}-{args.layers}"


def prepare_base(args: argparse.Namespace) -> Path:
    import torch

    from qtrain.models.build import write_random_base
    from qtrain.models.tokenizer import load_tokenizer

    cfg = llama_config(args.hidden, args.layers)
    return write_random_base(cfg, load_tokenizer(str(TOKENIZER)), SEED, torch.bfloat16, model_dir(args))


def qtrain_peft_section(method: str) -> dict:
    """The same settings as the peft side, in recipe keys."""
    return {"lora": {"r": RANK, "alpha": 2.0 * RANK}, "dora": {"r": RANK, "alpha": 2.0 * RANK},
            "prompt_tuning": {"num_virtual_tokens": VIRTUAL}, "prefix_tuning": {"num_virtual_tokens": VIRTUAL},
            "bitfit": {"targets": TARGETS}}.get(method, {})


def build_qtrain(method: str, base: Path, tmp: str, threads: int):
    import torch

    from qtrain.config import recipe_from_dict
    from qtrain.train.loss import batch_logits, causal_lm_loss_sum, count_trained_tokens
    from qtrain.train.setup import build_model

    recipe = recipe_from_dict({
        "output_dir": tmp, "seed": SEED, "model": {"path": str(base), "dtype": "float32"},
        "quant": {"method": "none" if method == "full" else "nf4", "double_quant": True},
        "peft": {"method": method, **qtrain_peft_section(method)},
        "data": {"path": str(REPO / "data" / "quickstart" / "train.jsonl"), "packing": False},
        "train": {"gradient_checkpointing": False, "autocast": "off", "num_threads": threads},
    })
    model, _ = build_model(recipe, base, torch.device("cpu"))
    model.train()

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        logits = batch_logits(model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
        return causal_lm_loss_sum(logits, input_ids) / max(1, count_trained_tokens(input_ids))

    return model, loss_fn


def peft_config(method: str, hidden: int):
    import peft

    common = {"task_type": "CAUSAL_LM"}
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS,
                               use_dora=method == "dora", **common)
    if method == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                              **common)
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL, **common)
    if method == "prefix_tuning":  # qtrain's default: Li & Liang's MLP, width = hidden size
        return peft.PrefixTuningConfig(num_virtual_tokens=VIRTUAL, prefix_projection=True,
                                       encoder_hidden_size=hidden, **common)
    return peft.BeftConfig(target_modules=TARGETS, **common)


def build_peft(method: str, base: Path, hidden: int):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, quantization_config=quant,
                                                 device_map={"": "cpu"}, local_files_only=True)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft_config(method, hidden))
    model.train()

    def loss_fn(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, labels=input_ids).loss

    return model, loss_fn


def run_side(args: argparse.Namespace) -> dict:
    import torch

    kind, method = args.side.split(":")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(SEED)
        if kind == "peft":
            model, loss_fn = build_peft(method, model_dir(args), args.hidden)
        else:
            model, loss_fn = build_qtrain(method, model_dir(args), tmp, args.threads)
    return measure(model, loss_fn, args, time.perf_counter() - t0)


ARGS = ("hidden", "layers", "seq", "batch", "steps", "warmup", "threads")
LAST = ("first_loss", "final_loss", "trainable_params", "threads")


def run_child(args: argparse.Namespace, side: str) -> dict:
    return h.run_json(h.side_argv("benchmarks.bench_methods", side, args, ARGS), f"bench_methods: the {side!r} side")


def ratios(ours: dict, other: dict) -> dict:
    return {"step_time": h.ratio(ours, other, "median_step_s"), "cpu_time": h.ratio(ours, other, "median_cpu_s"),
            "peak_memory": h.ratio(ours, other, "peak_rss_mib"),
            "train_phase_peak_memory": h.ratio(ours, other, "peak_rss_train_mib")}


def compare(args: argparse.Namespace) -> dict:
    """Write the base once; per method run peft, qtrain, peft, qtrain, ... (background load hits both alike)."""
    run_child(args, "prepare")
    tokens = args.batch * args.seq
    per_method = {}
    for method in args.methods:
        runs: dict[str, list[dict]] = {"qtrain": [], "peft": []}
        for _ in range(args.rounds):
            if method in PEFT_HAS:
                runs["peft"].append(run_child(args, f"peft:{method}"))
            runs["qtrain"].append(run_child(args, f"qtrain:{method}"))
        entry = {"qtrain": h.pooled(runs["qtrain"], tokens, PEAKS, LAST)}
        if runs["peft"]:
            entry["peft"] = h.pooled(runs["peft"], tokens, PEAKS, LAST)
            entry["qtrain_over_peft"] = ratios(entry["qtrain"], entry["peft"])
            entry["within_bar"] = entry["qtrain_over_peft"]["step_time"] <= 1.1
        per_method[method] = entry
    if "lora" in per_method:
        for method, entry in per_method.items():
            entry["qtrain_over_qtrain_lora"] = ratios(entry["qtrain"], per_method["lora"]["qtrain"])
    return {"device": h.cpu_key(args.threads), "date": h.now(),
            "config": {"model": llama_config(args.hidden, args.layers), "seq": args.seq, "batch": args.batch,
                       "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
                       "compute": "fp32, NF4 double-quant base (full: unquantized), no gradient checkpointing",
                       "lora": {"r": RANK, "alpha": 2 * RANK, "targets": TARGETS},
                       "virtual_tokens": VIRTUAL, "model_dir": str(model_dir(args))},
            "methods": per_method, "versions": h.versions()}


def report(result: dict, out: Path | None) -> None:
    """Print the result; merge it into `out` per method, so a run of some methods keeps the others'
    figures (each method's entry carries the date and rounds of the run that measured it)."""
    print(json.dumps(result, indent=2))
    if not out:
        return
    for entry in result["methods"].values():
        entry.update(date=result["date"], rounds=result["config"]["rounds"])
    merge_result(out, result["device"], result, _keep_other_methods)


def _keep_other_methods(old: dict | None, new: dict) -> dict:
    """`new`, plus the methods of `old` it did not measure (when both ran the same model)."""
    if old is None or old["config"]["model"] != new["config"]["model"]:
        return new
    return {**new, "methods": {**old["methods"], **new["methods"]}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.side == "prepare":
        print(json.dumps({"model_dir": str(prepare_base(args))}))
    elif args.side:
        print(json.dumps(run_side(args)))
    else:
        report(compare(args), args.out)


if __name__ == "__main__":
    main()
