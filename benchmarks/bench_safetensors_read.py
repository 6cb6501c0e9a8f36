"""Reading a model's rows from safetensors: qtrain's plain reads (what the loader uses) vs the library.

    python -m benchmarks.bench_safetensors_read [--hidden 1024] [--layers 12] [--rounds 3] [--world 1]

The loader reads each tensor in row chunks of ~1M values and converts them to fp32 for
quantization. Two readers do exactly that, each in a fresh interpreter, over the same bf16 file:
- `plain`: qtrain's `SafetensorsFile.rows` (parse the header, `readinto` a tensor we allocate);
- `library`: `safe_open(path).get_slice(name)[rows]`, the file opened per tensor (so one tensor
  is mapped at a time), the fp32 conversion being the only copy.
With `--world N` each reader reads rank 0's rows only (torch.chunk order), as a sharded load does.
Reported per reader: seconds and peak RSS above the starting RSS (anonymous and file-backed
pages; a mapped file's pages count while mapped), one sample per round.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20


def _rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _chunks(shape: list[int], world: int) -> list[tuple[int, int]]:
    """Rank 0's rows of a tensor of `shape`, in chunks of ~CHUNK values (as the loader reads them)."""
    cols = max(1, CHUNK // max(1, shape[1] if len(shape) > 1 else 1))
    stop = min(-(-shape[0] // world), shape[0])
    return [(r, min(stop, r + cols)) for r in range(0, stop, cols)]


def _plain_reads(path: Path, world: int):
    from qtrain.models.safetensors_read import SafetensorsFile

    with SafetensorsFile(path) as fh:
        for key in fh.keys():
            for start, stop in _chunks(list(fh.shape(key)), world):
                yield fh.rows(key, start, stop)


def _library_reads(path: Path, world: int):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    for key in keys:
        with safe_open(str(path), framework="pt") as fh:  # per tensor: one tensor mapped at a time
            view = fh.get_slice(key)
            for start, stop in _chunks(view.get_shape(), world):
                yield view[start:stop]


def measure(reader: str, path: Path, world: int) -> dict:
    import torch

    start, peak, done = _rss_kib(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    t0 = time.perf_counter()
    values = 0
    for chunk in (_library_reads if reader == "library" else _plain_reads)(path, world):
        values += chunk.to(torch.float32).numel()
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    return {"reader": reader, "seconds": round(seconds, 3), "peak_rss_mib": round((peak[0] - start) / 1024, 1),
            "values": values}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_safetensors_read", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--child", nargs=2, metavar=("READER", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.world)))
        return
    from benchmarks.bench_sharding import write_model

    path = write_model(args.hidden, args.layers, intermediate=args.hidden * 11 // 4, vocab=1024) / "model.safetensors"
    rows = []
    for _ in range(args.rounds):
        for reader in ("plain", "library"):
            cmd = [sys.executable, "-m", "benchmarks.bench_safetensors_read", "--world", str(args.world),
                   "--child", reader, str(path)]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    summary = {r: {k: [x[k] for x in rows if x["reader"] == r] for k in ("seconds", "peak_rss_mib")}
               for r in ("plain", "library")}
    print(json.dumps({"file_mib": round(path.stat().st_size / 2**20, 1), "world": args.world, "runs": summary},
                     indent=2))


if __name__ == "__main__":
    main()
