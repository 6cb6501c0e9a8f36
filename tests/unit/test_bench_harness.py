"""benchmarks/_harness.lockstep: sides in their own processes, one step each in turn, the order rotating."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import _harness as h


def _side(name: str, log: Path, fail_at: int | None = None) -> list[str]:
    """A side that appends its name to `log` on every step (and raises on step `fail_at`)."""
    code = (
        "import sys\n"
        "from benchmarks._harness import serve_steps\n"
        "n = [0]\n"
        "def step():\n"
        "    n[0] += 1\n"
        f"    if n[0] == {fail_at!r}:\n"
        "        raise RuntimeError('side failed on purpose')\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        f"        f.write({name!r} + '\\n')\n"
        "print('a library talking on stdout', flush=True)\n"
        "serve_steps(step)\n"
    )
    return [sys.executable, "-c", code]


def test_sides_step_one_at_a_time_in_rotating_order(tmp_path):
    log = tmp_path / "order.txt"
    times = h.lockstep({"a": _side("a", log), "b": _side("b", log)}, steps=3, warmup=1)
    # warm-up round a b, then rounds b a, a b, b a: who goes first alternates
    assert log.read_text().split() == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert sorted(times) == ["a", "b"] and all(len(t) == 3 and min(t) >= 0.0 for t in times.values())


def test_a_side_that_dies_fails_the_benchmark(tmp_path):
    log = tmp_path / "order.txt"
    with pytest.raises(h.SideFailed, match="'b' side ended before answering"):
        h.lockstep({"a": _side("a", log), "b": _side("b", log, fail_at=2)}, steps=3, warmup=1)
    assert log.read_text().split() == ["a", "b"]  # b went first in round 2 and raised; a was not stepped again
