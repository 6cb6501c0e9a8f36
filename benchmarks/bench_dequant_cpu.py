"""NF4 dequantization on the CPU: qtrain's kernel (nf4_cpu.cpp) vs bitsandbytes' CPU ops, the anchor's path.

    python -m benchmarks.bench_dequant_cpu [--threads 1,2 --reps 40 --out benchmarks/results/dequant_cpu.json]

Both sides decode the same double-quantized weights (bitsandbytes' bytes, blocksize 64) to float32
and bfloat16: bitsandbytes as its Linear4bit does on every use (`dequantize_blockwise` of the absmax
codes, + offset, then `dequantize_4bit`), qtrain in one call (`nf4_cpu.dequantize`). Shapes: the
CPU step benchmark's projections (hidden 1024) and Llama-3-8B's. The sides alternate call by call
in one process (a shared VM's speed drifts); each figure is the median over `--reps` calls, with
the output written at GB/s. The values are checked bit-identical first. Outputs come from qtrain's
caching host allocator on both sides (`train.host_allocator: auto`, as in training on a CPU).

In a training step the weights come from memory rather than a warm cache, so the step-level saving
is what benchmarks/bench_cpu_step.py measures; this isolates the kernel.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks import _harness as h
from benchmarks._results import merge_result

SHAPES = {"bench q/k/v/o (1024x1024)": (1024, 1024), "bench gate/up (2752x1024)": (2752, 1024),
          "bench down (1024x2752)": (1024, 2752), "llama3-8b gate/up (14336x4096)": (14336, 4096)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dequant_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file, keyed by CPU")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t]
    if args.reps < 3 or not args.threads or min(args.threads) < 1:
        p.error("--reps must be >= 3 and --threads positive integers")
    return args


def sides(shape: tuple[int, int], dtype):
    """(qtrain, anchor) callables decoding one random weight of `shape`, after checking they agree bit for bit."""
    import torch

    from qtrain.quant.nf4 import NF4Spec, NF4Weight
    from qtrain_kernels import dispatch, nf4_cpu

    q = NF4Weight.quantize(torch.randn(shape, generator=torch.Generator().manual_seed(0)), NF4Spec(64, True))
    dequantize_4bit = dispatch._bnb_op("dequantize_4bit")
    if dequantize_4bit is None:
        raise SystemExit("bitsandbytes' dequantize_4bit op is not registered: the anchor cannot run")
    if nf4_cpu.unavailable_reason():
        raise SystemExit(f"qtrain's CPU kernel is unavailable: {nf4_cpu.unavailable_reason()}")

    def qtrain():
        return nf4_cpu.dequantize(q.packed, q.absmax, q.shape, dtype, 64, q.absmax2, q.offset)

    def anchor():
        absmax = dispatch.dequantize_absmax(q.absmax, q.absmax2, q.offset)
        return dequantize_4bit.default(q.packed, absmax, 64, "nf4", list(shape), dtype)

    a, b = qtrain(), anchor()
    same = torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    if not same:
        raise SystemExit(f"qtrain and bitsandbytes disagree on {shape} {dtype}: max |diff| {(a - b).abs().max()}")
    return qtrain, anchor


def measure(args: argparse.Namespace) -> list[dict]:
    import torch

    from qtrain.train.host_memory import choose_host_allocator

    # Outputs come from qtrain's caching allocator on both sides, as in `qtrain train` on a CPU: with
    # glibc's, every call on a large weight maps fresh pages, and page faults, not decoding, set the time.
    choose_host_allocator("auto", torch.device("cpu"))
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, shape in SHAPES.items():
            for dtype in (torch.float32, torch.bfloat16):
                fns = dict(zip(("qtrain", "bitsandbytes"), sides(shape, dtype)))
                times = {k: [] for k in fns}
                for i in range(args.reps + 3):
                    for k in (("qtrain", "bitsandbytes") if i % 2 == 0 else ("bitsandbytes", "qtrain")):
                        t0 = time.perf_counter()
                        fns[k]()
                        if i >= 3:
                            times[k].append(time.perf_counter() - t0)
                ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                out_gb = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size() / 1e9
                rows.append({"shape": name, "dtype": str(dtype).replace("torch.", ""), "threads": threads,
                             **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                             **{f"{k}_out_gb_s": round(out_gb / (v / 1e3), 1) for k, v in ms.items()},
                             "time_qtrain_over_bitsandbytes": round(ms["qtrain"] / ms["bitsandbytes"], 3)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = measure(args)
    result = {"device": h.cpu_key(max(args.threads)), "cpu": h.cpu_name(), "cpu_flags": h.cpu_flags(),
              "date": h.now(), "reps": args.reps, "rows": rows, "versions": h.versions(),
              "anchor": "bitsandbytes dequantize_blockwise(absmax codes) + offset, then dequantize_4bit (CPU ops), "
                        "as its Linear4bit does per use",
              "median_time_qtrain_over_bitsandbytes": round(statistics.median(
                  r["time_qtrain_over_bitsandbytes"] for r in rows), 3)}
    if args.out:
        merge_result(args.out, result["device"], result)
    print(json.dumps({k: result[k] for k in ("device", "median_time_qtrain_over_bitsandbytes")}))


if __name__ == "__main__":
    main()
