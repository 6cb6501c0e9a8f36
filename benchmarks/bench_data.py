"""Data at scale: first build vs cached start of a large instruction set, 1 and 2 ranks; and packing's payoff.

    python -m benchmarks.bench_data [--rows 200000,1000000 --ranks 1,2 --out benchmarks/results/data_cpu.json]
    python -m benchmarks.bench_data --packing [--steps 20 --out benchmarks/results/data_cpu.json]

Build mode: synthetic instruction rows (about 650 bytes and 130 tokens each, written once to
/tmp/qtrain_bench/instructions-<rows>.jsonl) go through `qtrain.data.build_datasets` exactly as
`qtrain train` calls it for the quickstart recipe pointed at them (bundled tokenizer, max_len 128,
packing on, eval_split 0.05) into a
fresh cache dir ("first build"), then again with that cache ("cached start"). Each rank is its own
process (RANK/LOCAL_WORLD_SIZE set as torchrun would; the data layer uses no collectives), all
started together on one cache dir. Per rank: seconds in build_datasets, lifetime peak RSS of the
process and of its tokenizing workers, and the data's proportional set size (PSS after the data
is opened and every token page read, minus PSS before; measured while all ranks hold it, so
shared pages count once per node). Bars (issue 11, 2 CPU cores): 1M rows first build <= 180 s and
peak RSS <= 1.5 GB; cached start <= 10 s; node data memory at 2 ranks <= 1.1x one rank's.

Packing mode: the quickstart recipe (fp32, its model and bundled data) trains `--steps` steps per
layout -- unpacked padded, packed padded, packed padding-free, unpacked padding-free -- each in a
fresh process; reports real tokens/s, trained tokens per step and median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import _harness as h
from benchmarks._results import merge_result

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "quickstart" / "tokenizer"
WORK = Path(tempfile.gettempdir()) / "qtrain_bench"
LAYOUTS = {"unpacked-padded": (False, False), "packed-padded": (True, False),
           "packed-padding-free": (True, True), "unpacked-padding-free": (False, True)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="200000,1000000", help="comma-separated dataset sizes")
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--packing", action="store_true", help="the packing benchmark instead of the build one")
    p.add_argument("--steps", type=int, default=20, help="packing mode: timed steps per layout (after 2 warm-up)")
    p.add_argument("--out", type=Path, default=None, help="merge the result into this JSON file")
    p.add_argument("--child", choices=("rank", "layout"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--layout", choices=tuple(LAYOUTS), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- synthetic data -----------------------------------------------------------------------------

def synthetic_file(rows: int) -> Path:
    """Instruction rows of ~650 bytes in the bundled data's words (so the bundled tokenizer sees text
    like what it was trained on: ~5 bytes a token), the same for a given size everywhere (seeded)."""
    path = WORK / f"instructions-{rows}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(0)
    bundled = (REPO / "data" / "quickstart" / "train.jsonl").read_text()
    words = sorted(set(re.findall(r"[A-Za-z]+", bundled)))
    sentences = [" ".join(rng.choices(words, k=rng.randint(6, 14))) + "." for _ in range(4000)]
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            prompt = f"Task {i}: " + " ".join(rng.choices(sentences, k=5)) + "\n"
            response = " ".join(rng.choices(sentences, k=rng.randint(4, 9)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    tmp.replace(path)
    return path


# ---- memory (child side) ------------------------------------------------------------------------

def pss_mib() -> float:
    """Proportional set size: shared pages (the mapped cache) split among the processes mapping them."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib(who: int) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def barrier(directory: Path, name: str, world: int, rank: int) -> None:
    """Wait until every rank has reached `name` (files in a shared directory)."""
    (directory / f"{name}-{rank}").touch()
    while len(list(directory.glob(f"{name}-*"))) < world:
        time.sleep(0.05)


def rank_child(args: argparse.Namespace) -> dict:
    import resource

    import datasets  # noqa: F401 -- imported before the PSS baseline: only the data should count
    import pyarrow  # noqa: F401

    from qtrain.config.schema import DataConfig
    from qtrain.data import build_datasets
    from qtrain.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER))
    cfg = DataConfig(path=str(args.data), format="instruction", max_len=128, packing=True, eval_split=0.05)
    before = pss_mib()
    t0 = time.perf_counter()
    bundle = build_datasets(cfg, tokenizer, 0, cache_dir=args.cache, local_world_size=args.world)
    seconds = time.perf_counter() - t0
    bundle.train.rows.checksum()  # read every token page, as an epoch of training would
    sync = args.cache / ".bench"
    barrier(sync, "loaded", args.world, args.rank)
    data_pss = pss_mib() - before
    barrier(sync, "measured", args.world, args.rank)
    return {"rank": args.rank, "status": bundle.cache_status, "data_s": round(seconds, 2),
            "peak_rss_mib": round(peak_rss_mib(resource.RUSAGE_SELF), 1),
            "workers_peak_rss_mib": round(peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
            "data_pss_mib": round(data_pss, 1), "train_sequences": len(bundle.train)}


def launch_ranks(data: Path, cache: Path, world: int) -> list[dict]:
    shutil.rmtree(cache / ".bench", ignore_errors=True)
    (cache / ".bench").mkdir(parents=True)
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world)}
        argv = [sys.executable, "-m", "benchmarks.bench_data", "--child", "rank", "--data", str(data),
                "--cache", str(cache), "--rank", str(rank), "--world", str(world)]
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"bench_data: a rank failed (exit {proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def build_case(rows: int, world: int) -> dict:
    data = synthetic_file(rows)
    cache = WORK / f"cache-{rows}-{world}"
    shutil.rmtree(cache, ignore_errors=True)
    first = launch_ranks(data, cache, world)
    cached = launch_ranks(data, cache, world)
    builds = len((cache / "builds.log").read_text().splitlines())
    shutil.rmtree(cache, ignore_errors=True)
    return {"rows": rows, "ranks": world, "file_mib": round(data.stat().st_size / 2**20, 1), "builds": builds,
            "first_build": first, "cached_start": cached,
            "first_build_s": max(r["data_s"] for r in first), "cached_start_s": max(r["data_s"] for r in cached),
            "peak_rss_mib": max(max(r["peak_rss_mib"], r["workers_peak_rss_mib"]) for r in first),
            "node_data_pss_mib": round(sum(r["data_pss_mib"] for r in cached), 1)}


def build_benchmark(args: argparse.Namespace) -> dict:
    cases = [build_case(int(n), int(w)) for n in args.rows.split(",") for w in args.ranks.split(",")]
    bars = {}
    for n in {c["rows"] for c in cases}:
        one = next((c for c in cases if c["rows"] == n and c["ranks"] == 1), None)
        two = next((c for c in cases if c["rows"] == n and c["ranks"] == 2), None)
        entry = {"cached_start_s<=10": all(c["cached_start_s"] <= 10 for c in cases if c["rows"] == n)}
        if one is not None:
            entry.update({"first_build_s": one["first_build_s"], "peak_rss_mib": one["peak_rss_mib"]})
            if n >= 1_000_000:
                entry.update({"first_build_s<=180": one["first_build_s"] <= 180,
                              "peak_rss_mib<=1536": one["peak_rss_mib"] <= 1536})
        if one is not None and two is not None:
            ratio = two["node_data_pss_mib"] / max(one["node_data_pss_mib"], 1e-9)
            entry.update({"node_data_memory_2_vs_1": round(ratio, 3), "node_data_memory<=1.1x": ratio <= 1.1})
        bars[str(n)] = entry
    return {"mode": "build", "cases": cases, "bars": bars}


# ---- packing ------------------------------------------------------------------------------------

def layout_child(args: argparse.Namespace) -> dict:
    from qtrain.config import load_recipe
    from qtrain.data import collate
    from qtrain.distributed.env import DistEnv
    from qtrain.train.loop import train_step
    from qtrain.train.loss import batch_trained_tokens
    from qtrain.train.setup import prepare

    packing, padding_free = LAYOUTS[args.layout]
    out = Path(tempfile.mkdtemp(prefix="qtrain-bench-packing-"))
    recipe = load_recipe(REPO / "configs" / "quickstart.yaml", [
        f"output_dir={out}", "model.dtype=float32", f"data.packing={str(packing).lower()}",
        f"data.padding_free={str(padding_free).lower()}", "logging.progress=false"])
    s = prepare(recipe, DistEnv())
    s.data.header(recipe.train.micro_batch_size, s.data.flat)  # fills report.padding
    stream = s.data.train_stream(recipe.train.micro_batch_size, recipe.seed)
    times, tokens, trained = [], [], []
    for step in range(args.steps + 2):
        micro = [next(stream) for _ in range(recipe.train.grad_accum)]
        result = train_step(s, micro)
        if step >= 2:
            times.append(result.seconds)
            tokens.append(result.tokens)
            trained.append(sum(batch_trained_tokens(collate(m, s.tokenizer.pad_token_id, flat=s.data.flat))
                               for m in micro))
    shutil.rmtree(out, ignore_errors=True)
    median = statistics.median(times)
    return {"layout": args.layout, "median_step_s": round(median, 4),
            "tokens_per_s": round(sum(tokens) / sum(times), 1),
            "trained_tokens_per_step": statistics.mean(trained), "tokens_per_step": statistics.mean(tokens),
            "trained_tokens_per_s": round(sum(trained) / sum(times), 1), "padding": s.data.report.padding}


def packing_benchmark(args: argparse.Namespace) -> dict:
    runs = {}
    for layout in LAYOUTS:
        argv = [sys.executable, "-m", "benchmarks.bench_data", "--child", "layout", "--layout", layout,
                "--steps", str(args.steps)]
        proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_data: layout {layout} failed (exit {proc.returncode})")
        runs[layout] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = runs["unpacked-padded"]
    ratios = {k: {"trained_tokens_per_s": round(r["trained_tokens_per_s"] / base["trained_tokens_per_s"], 3),
                  "trained_tokens_per_step": round(r["trained_tokens_per_step"] / base["trained_tokens_per_step"], 3)}
              for k, r in runs.items()}
    return {"mode": "packing", "recipe": "configs/quickstart.yaml (model.dtype=float32)", "steps": args.steps,
            "layouts": runs, "vs_unpacked_padded": ratios}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "rank":
        print(json.dumps(rank_child(args)))
        return
    if args.child == "layout":
        print(json.dumps(layout_child(args)))
        return
    result = packing_benchmark(args) if args.packing else build_benchmark(args)
    result.update({"cpu": h.cpu_name(), "cpu_flags": h.cpu_flags(), "cpus": len(os.sched_getaffinity(0)),
                   "loadavg_1m": os.getloadavg()[0], "when": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    print(json.dumps(result, indent=2))
    if args.out is None:
        return
    if args.packing:
        merge_result(args.out, "packing", result)
        return
    for n in sorted({c["rows"] for c in result["cases"]}):  # one entry per size: a run of one size keeps the others
        merge_result(args.out, f"build-{n}", {**result, "cases": [c for c in result["cases"] if c["rows"] == n],
                                               "bars": {str(n): result["bars"][str(n)]}})


if __name__ == "__main__":
    main()
