"""Reading a model's rows from safetensors: the library (what the loader uses) vs plain file reads.

    python -m benchmarks.bench_safetensors_read [--hidden 1024] [--layers 12] [--rounds 3] [--world 1]

The loader reads each tensor in row chunks of ~1M values and converts them to fp32 for
quantization. Two readers do exactly that, each in a fresh interpreter, over the same bf16 file:
- `library`: `safe_open(path).get_slice(name)[rows]`, the file opened per tensor and each slice
  copied (qtrain.models.load.TensorReader);
- `plain`: parse the header and `readinto` a tensor we allocate (the reader qtrain had before).
With `--world N` each reader reads rank 0's rows only (torch.chunk order), as a sharded load does.
Reported per reader: seconds and peak RSS above the starting RSS (anonymous and file-backed
pages; a mapped file's pages count while mapped), one sample per round.
"""

from __future__ import annotations

import argparse
import json
import struct
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


def _plain_reads(path: Path, world: int):
    import torch

    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for info in header.values():
            shape, dtype = info["shape"], dtypes[info["dtype"]]
            cols = max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
            per = -(-shape[0] // world)
            row_bytes = cols * torch.empty((), dtype=dtype).element_size()
            for r in range(0, min(per, shape[0]), max(1, CHUNK // cols)):
                rows = min(max(1, CHUNK // cols), min(per, shape[0]) - r)
                out = torch.empty((rows, *shape[1:]), dtype=dtype)
                fh.seek(8 + n + info["data_offsets"][0] + r * row_bytes)
                fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
                yield out


def _library_reads(path: Path, world: int):
    from qtrain.models.load import iter_tensors

    for reader in iter_tensors([path]):
        shape = reader.shape
        cols = max(1, CHUNK // max(1, (shape[1] if len(shape) > 1 else 1)))
        stop = min(-(-shape[0] // world), shape[0])
        for r in range(0, stop, cols):
            yield reader.rows(r, min(stop, r + cols))


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
