"""The harness every benchmark shares: sides in fresh interpreters, pooled rounds, ratios, device keys.

A benchmark compares *sides* (qtrain and the anchor, or settings of qtrain). Each side runs in its own
fresh interpreter (`python -m benchmarks.NAME --side S ...`) that prints one JSON line, so a side's
peak memory is its own; the parent process imports no torch, so it adds nothing to a child's
`ru_maxrss` (on Linux a child started by vfork+exec inherits its parent's high-water mark). Rounds
alternate the sides (a, b, a, b, ...) so background load falls on all of them alike. `lockstep` goes
further for step times: both sides' interpreters live at once and take single steps in turn, so a
slow moment of a shared machine falls on both, while each keeps its own process settings.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


class SideFailed(SystemExit):
    pass


def run_json(argv: list[str], what: str, env: dict | None = None) -> dict:
    """Run `argv` (a side or a launcher) in REPO; its last stdout line is the JSON result."""
    import json

    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SideFailed(f"{what} failed (exit {proc.returncode}); its stderr is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOCKSTEP_MARK = "@lockstep "  # prefixes the lines a serving side writes for `lockstep` (libraries may print too)


def serve_steps(step: Callable[[], object]) -> None:
    """A side's half of `lockstep`: say ready, then run one `step()` per "step" line on stdin and answer
    with its wall seconds; any other line (or EOF) ends it."""
    print(f"{LOCKSTEP_MARK}ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            return
        t0 = time.perf_counter()
        step()
        print(f"{LOCKSTEP_MARK}{time.perf_counter() - t0:.4f}", flush=True)


def _lockstep_reply(proc: subprocess.Popen, what: str) -> str:
    for line in proc.stdout:
        if line.startswith(LOCKSTEP_MARK):
            return line[len(LOCKSTEP_MARK):].strip()
    raise SideFailed(f"{what} ended before answering (exit {proc.wait()}); its stderr is above")


def lockstep(argvs: dict[str, list[str]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Step times of sides that serve steps (`serve_steps`), all alive at once, stepping one at a time.

    Each side is its own interpreter, started and built one after the other. Then `warmup` untimed
    steps each, then `steps` rounds in which every side takes one step while the others wait idle on
    stdin; the order rotates every round. Returns each side's timed step seconds, in order.
    """
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, argv in argvs.items():
            procs[name] = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            _lockstep_reply(procs[name], f"the {name!r} side")
        names = list(procs)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(warmup + steps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                procs[name].stdin.write("step\n")
                procs[name].stdin.flush()
                seconds = float(_lockstep_reply(procs[name], f"the {name!r} side"))
                if i >= warmup:
                    times[name].append(seconds)
        return times
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()


def side_argv(module: str, side: str, args, names: tuple[str, ...], **extra: str) -> list[str]:
    """`python -m MODULE --side SIDE --name value ...` for the named attributes of `args` (None skipped)."""
    argv = [sys.executable, "-m", module, "--side", side]
    for name in names:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for name, value in extra.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def pooled(runs: list[dict], tokens_per_step: int, peak_keys: tuple[str, ...] = (),
           last_keys: tuple[str, ...] = ()) -> dict:
    """One side over its rounds: medians over every timed step, the worst peaks, the last run's other fields."""
    times = [t for r in runs for t in r["step_times"]]
    median = statistics.median(times)
    out = {"median_step_s": round(median, 4), "min_step_s": min(times), "tokens_per_s": round(tokens_per_step / median, 1),
           "step_times": times}
    if all("cpu_times" in r for r in runs):
        out["median_cpu_s"] = round(statistics.median([t for r in runs for t in r["cpu_times"]]), 4)
    for key in peak_keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = max(values) if values else None
    for key in last_keys:
        out[key] = runs[-1].get(key)
    return out


def ratio(num: dict, den: dict, key: str) -> float | None:
    return round(num[key] / den[key], 3) if num.get(key) and den.get(key) else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "deepspeed", "qtrain"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def cpu_flags() -> list[str]:
    """The instruction sets that decide CPU speed here (bf16 is ~30x slower than fp32 without them)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)


def cpu_key(threads: int) -> str:
    """e.g. `cpu-AMD-EPYC-avx2-2t`: the CPU, its bf16-relevant instruction set, the thread count."""
    flags = cpu_flags()
    isa = "amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags else \
        "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "generic"
    return f"cpu-{'-'.join(cpu_name().split())}-{isa}-{threads}t"


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# ---- memory probes (inside a side) ----------------------------------------------------------------

def rss_mib(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (high-water mark) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_hwm() -> bool:
    """Reset VmHWM (Linux `clear_refs` 5) so a phase's peak can be read on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
