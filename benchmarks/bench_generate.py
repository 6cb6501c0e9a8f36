"""Generation throughput on CPU: one adapter, four adapters in one mixed batch, merged; qtrain vs peft.

    python -m benchmarks.bench_generate [--hidden 1024 --layers 8 --batch 4 --prompt 32 --new 32 --rank 16
                                         --rounds 3 --threads N --out benchmarks/results/generate_cpu.json]

Every case decodes the same batch of random prompts (equal length, no padding) for exactly
`--new` tokens (EOS never stops a row) and reports tokens/s = batch × new / median wall time.
Cases run interleaved, round by round, so background load falls on all of them alike.

- qtrain: `load_base` + `AdapterSet` + the `generate_tokens` loop (KV cache), on the NF4 base
  (as trained) and on the bf16 base; `mixed4` gives each row its own adapter via `use_adapters`;
  `merged` is `AdapterSet.merge()` on a second bf16 copy (merged once, before timing).
- peft (anchor): `AutoModelForCausalLM.from_pretrained(bf16)` + `PeftModel` with the same four
  adapter dirs + `model.generate(do_sample=False)`; `mixed4` passes `adapter_names=`; `merged` is
  `merge_and_unload()`. The anchor runs on the bf16 base: bitsandbytes' 4-bit CPU inference path
  needs the optional `kernels` package, which is not installed here.

The bar: a mixed batch of 4 adapters costs at most 1.3x a single-adapter batch of the same size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import _harness as h
from benchmarks._results import merge_result
from benchmarks.bench_cpu_step import llama_config

TOKENIZER = h.REPO / "data" / "quickstart" / "tokenizer"
N_ADAPTERS = 4
BAR = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import os

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=32, help="generated tokens per row")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--cases", default="", help="comma-separated subset of case names (default: all)")
    p.add_argument("--cache", type=Path, default=None, help="work dir (default /tmp/qtrain_bench)")
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file, keyed by device")
    args = p.parse_args(argv)
    if args.batch % N_ADAPTERS:
        p.error(f"--batch must be a multiple of {N_ADAPTERS} (one adapter per row group)")
    return args


def prepare(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The random-init bf16 base (shared with bench_cpu_step) and four random adapters on it."""
    import torch

    from qtrain.checkpoint.adapter_io import save_adapter
    from qtrain.config.schema import PeftConfig
    from qtrain.models.build import write_random_base
    from qtrain.models.load import load_model
    from qtrain.models.tokenizer import load_tokenizer
    from qtrain.peft.inject import inject_lora, lora_modules

    root = args.cache or Path(tempfile.gettempdir()) / "qtrain_bench"
    base = write_random_base(llama_config(args.hidden, args.layers), load_tokenizer(str(TOKENIZER)), 0,
                             torch.bfloat16, root / f"llama-{args.hidden}-{args.layers}")
    cfg = PeftConfig(r=args.rank, alpha=2 * args.rank)
    dirs = []
    for i in range(N_ADAPTERS):
        d = root / f"adapters-{args.hidden}-{args.layers}-r{args.rank}" / f"a{i}"
        if not (d / "adapter_model.safetensors").is_file():
            model = load_model(base, torch.float32, torch.device("cpu"), None)
            torch.manual_seed(100 + i)
            inject_lora(model, cfg)
            with torch.no_grad():
                for mod in lora_modules(model).values():
                    mod.lora_B.weight.normal_(std=0.02)
            save_adapter(model, cfg, str(base), d)
        dirs.append(d)
    return base, dirs


def qtrain_cases(base: Path, adapters: list[Path], args: argparse.Namespace) -> dict:
    import torch

    from qtrain.infer.adapters import AdapterSet
    from qtrain.infer.decode import generate_tokens
    from qtrain.infer.load import BaseOptions, load_base
    from qtrain.infer.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=args.new)
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    mixed = [names[i % N_ADAPTERS] for i in range(args.batch)]
    cases = {}
    for label, quant in (("nf4", True), ("bf16", False)):
        opts = BaseOptions(dtype=torch.bfloat16, quant=BaseOptions().quant if quant else None)
        aset = AdapterSet(load_base(base, opts))
        for name, d in zip(names, adapters):
            aset.add_adapter(name, d)

        def run(rows, aset=aset):
            def go(prompts):
                with aset.use_adapters(rows):
                    return generate_tokens(aset.model, prompts, cfg, set(), 0)
            return go

        cases[f"qtrain_{label}_single"] = run(["a0"] * args.batch)
        cases[f"qtrain_{label}_mixed4"] = run(mixed)
    # Merged: its own copy of the bf16 base with a0 folded in once (merging is not timed).
    merged = AdapterSet(load_base(base, BaseOptions(dtype=torch.bfloat16, quant=None)))
    merged.add_adapter("a0", adapters[0])
    merged.set_adapter("a0")
    merged.merge()
    cases["qtrain_bf16_merged"] = lambda prompts: generate_tokens(merged.model, prompts, cfg, set(), 0)
    return cases


def peft_cases(base: Path, adapters: list[Path], args: argparse.Namespace) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16, local_files_only=True).eval()

    model = PeftModel.from_pretrained(load(), str(adapters[0]), adapter_name="a0")
    for i, d in enumerate(adapters[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.eval()
    merged = PeftModel.from_pretrained(load(), str(adapters[0]), adapter_name="a0").merge_and_unload().eval()
    mixed = [f"a{i % N_ADAPTERS}" for i in range(args.batch)]

    def hf(m, **kw):
        def go(prompts):
            ids = torch.tensor(prompts)
            with torch.inference_mode():
                out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False, pad_token_id=0, **kw)
            return out[:, ids.shape[1]:].tolist()
        return go

    def single(prompts):
        model.set_adapter("a0")
        return hf(model)(prompts)

    return {"peft_single": single, "peft_mixed4": hf(model, adapter_names=mixed), "peft_merged": hf(merged)}


def measure(cases: dict, prompts: list[list[int]], args: argparse.Namespace) -> tuple[dict, dict]:
    import os

    times: dict[str, list[float]] = {name: [] for name in cases}
    outputs = {name: fn(prompts) for name, fn in cases.items()}   # warm-up, and the tokens for the sanity check
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(prompts)
            times[name].append(time.perf_counter() - t0)
        load.append(os.getloadavg()[0])
    tokens = args.batch * args.new
    stats = {name: {"median_s": round(statistics.median(t), 4), "min_s": round(min(t), 4),
                    "tokens_per_s": round(tokens / statistics.median(t), 2), "times_s": [round(x, 4) for x in t]}
             for name, t in times.items()}
    stats["loadavg_1m"] = load
    return stats, outputs


def fp32_mixed_agreement(base: Path, adapters: list[Path], prompts: list[list[int]], args) -> float:
    """Greedy tokens of qtrain vs peft for the mixed batch in fp32, where rounding cannot split them.

    In bf16 the two differ in rounding order (peft adds B(A x)·s, qtrain one addmm), and on a
    random-init model, whose next-token logits are nearly flat, that flips near-ties.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qtrain.infer.adapters import AdapterSet
    from qtrain.infer.decode import generate_tokens
    from qtrain.infer.load import BaseOptions, load_base
    from qtrain.infer.sampling import SamplingConfig

    rows = [f"a{i % N_ADAPTERS}" for i in range(args.batch)]
    aset = AdapterSet(load_base(base, BaseOptions(dtype=torch.float32, quant=None)))
    for i, d in enumerate(adapters):
        aset.add_adapter(f"a{i}", d)
    with aset.use_adapters(rows):
        ours = generate_tokens(aset.model, prompts, SamplingConfig(max_new_tokens=args.new), set(), 0)
    del aset
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(adapters[0]), adapter_name="a0")
    for i, d in enumerate(adapters[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        theirs = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                       min_new_tokens=args.new, do_sample=False, pad_token_id=0, adapter_names=rows)
    return agreement(ours, theirs[:, ids.shape[1]:].tolist())


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated positions where two greedy runs chose the same token."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 4)


def ratio(stats: dict, num: str, den: str, key: str = "median_s") -> float | None:
    return round(stats[num][key] / stats[den][key], 3) if num in stats and den in stats else None


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base, adapters = prepare(args)
    cases = {**qtrain_cases(base, adapters, args), **peft_cases(base, adapters, args)}
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 8192, (args.batch, args.prompt), generator=g).tolist()
    stats, outputs = measure(cases, prompts, args)
    del cases
    mixed_over_single = {side: ratio(stats, f"{side}_mixed4", f"{side}_single")
                         for side in ("qtrain_nf4", "qtrain_bf16", "peft")}
    result = {
        "device": h.cpu_key(args.threads), "cpu": h.cpu_name(),
        "date": h.now(),
        "config": {"model": llama_config(args.hidden, args.layers), "batch": args.batch, "prompt_tokens": args.prompt,
                   "new_tokens": args.new, "rank": args.rank, "alpha": 2 * args.rank, "adapters": N_ADAPTERS,
                   "targets": "all 7 projections", "rounds": args.rounds, "threads": args.threads,
                   "decoding": "greedy, KV cache, EOS ignored (every row makes exactly new_tokens)",
                   "anchor": "transformers from_pretrained(bf16) + peft PeftModel; generate(do_sample=False, "
                             "min_new_tokens=new); mixed4: adapter_names=; merged: merge_and_unload()"},
        "cases": stats,
        "mixed4_over_single_time": mixed_over_single,
        "mixed4_over_single_min_time": {side: ratio(stats, f"{side}_mixed4", f"{side}_single", "min_s")
                                         for side in ("qtrain_nf4", "qtrain_bf16", "peft")},
        "bar": f"mixed4 / single <= {BAR} (median wall time)",
        "bar_met": {k: (v is not None and v <= BAR) for k, v in mixed_over_single.items()},
        "qtrain_over_peft_time": {"single": ratio(stats, "qtrain_bf16_single", "peft_single"),
                                  "mixed4": ratio(stats, "qtrain_bf16_mixed4", "peft_mixed4"),
                                  "merged": ratio(stats, "qtrain_bf16_merged", "peft_merged")},
        "greedy_token_agreement_qtrain_vs_peft": {
            k: agreement(outputs[f"qtrain_bf16_{k}"], outputs[f"peft_{k}"]) for k in ("single", "mixed4", "merged")
            if f"qtrain_bf16_{k}" in outputs and f"peft_{k}" in outputs},
        "greedy_token_agreement_qtrain_vs_peft_fp32_mixed4": fp32_mixed_agreement(base, adapters, prompts, args),
        "versions": h.versions(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        merge_result(args.out, result["device"], result)


if __name__ == "__main__":
    main()
