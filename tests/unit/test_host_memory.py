"""glibc's mmap threshold is fixed once by `qtrain train` (train/host_memory.py), unless the user set it."""

import os
import platform
import subprocess
import sys

import pytest

from qtrain.train.host_memory import ENV, THRESHOLD, TRIM_ENV, fix_mmap_threshold


class FakeLibc:
    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


def test_sets_glibc_mmap_and_trim_thresholds_once_with_their_parameter_numbers(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(TRIM_ENV, raising=False)
    libc = FakeLibc()
    assert fix_mmap_threshold(libc=libc) is True
    assert libc.calls == [(-3, THRESHOLD), (-1, 2 * THRESHOLD)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)


def test_the_users_own_trim_threshold_wins(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv(TRIM_ENV, "131072")
    libc = FakeLibc()
    assert fix_mmap_threshold(libc=libc) is True
    assert libc.calls == [(-3, THRESHOLD)]


def test_the_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv(ENV, "65536")
    libc = FakeLibc()
    assert fix_mmap_threshold(libc=libc) is False
    assert libc.calls == []


def test_a_refused_mallopt_is_reported_as_not_set(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert fix_mmap_threshold(libc=FakeLibc(result=0)) is False


# Fresh-process probes: libc's allocator driven through ctypes (argv[1] picks the mode).
_LIBC = """
import ctypes, sys
from qtrain.train.host_memory import fix_mmap_threshold
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
"""


def _printed_by(code: str, *modes: str) -> dict[str, int]:
    """{mode: the integer `code` prints when run with that mode}, without the user's glibc variables."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV, TRIM_ENV)}
    return {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, env=env,
                                     check=True).stdout) for mode in modes}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_big_frees_return_to_the_system_after_the_fix():
    """In a fresh process: free a 24 MiB block (glibc would raise its threshold to it), then
    allocate and free 40 blocks of 20 MiB, each followed by a live 256 KiB block: with the fix the RSS
    falls back; as glibc ships, the heap keeps them."""
    code = _LIBC + """
if sys.argv[1] == "fix":
    assert fix_mmap_threshold()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
p = libc.malloc(24 << 20); libc.memset(p, 1, 24 << 20); libc.free(p)
base = rss()
blocks, pins = [], []
for _ in range(40):
    b = libc.malloc(20 << 20); libc.memset(b, 1, 20 << 20); blocks.append(b)
    pins.append(libc.malloc(256 << 10))  # past the tcache: it lands right after the block
for b in blocks:
    libc.free(b)
print(rss() - base)
"""
    kept = _printed_by(code, "fix", "as-shipped")
    assert kept["fix"] < 50, kept
    assert kept["as-shipped"] > 400, kept


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_step_that_frees_the_heap_top_does_not_fault_it_in_again():
    """In a fresh process: 30 times allocate, touch and free an 8 MiB block (under the mmap threshold,
    so at the heap's top). With the mmap threshold alone fixed (the old fix), glibc trims the top after
    each free and every round faults 8 MiB in again; with the trim threshold fixed too, only the first."""
    code = _LIBC + """
import resource
from qtrain.train.host_memory import _M_MMAP_THRESHOLD, THRESHOLD
if sys.argv[1] == "fix":
    assert fix_mmap_threshold()
else:
    assert libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    b = libc.malloc(8 << 20); libc.memset(b, 1, 8 << 20); libc.free(b)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = _printed_by(code, "fix", "mmap-only")
    pages = (8 << 20) // 4096
    assert faults["fix"] < 3 * pages, faults
    assert faults["mmap-only"] > 20 * pages, faults


def test_engines_that_gather_parameters_take_the_low_threshold():
    from qtrain.distributed.deepspeed import DeepSpeedEngine
    from qtrain.distributed.fsdp import FSDPEngine
    from qtrain.distributed.plain import PlainEngine
    from qtrain.train.host_memory import GATHERING_THRESHOLD, threshold_for

    assert GATHERING_THRESHOLD < THRESHOLD
    assert threshold_for(FSDPEngine.gathers_parameters) == GATHERING_THRESHOLD
    assert threshold_for(PlainEngine.gathers_parameters) == THRESHOLD
    zero = DeepSpeedEngine.__new__(DeepSpeedEngine)  # the stage alone decides; no process group needed
    for stage, expected in [(2, THRESHOLD), (3, GATHERING_THRESHOLD)]:
        zero.stage = stage
        assert threshold_for(zero.gathers_parameters) == expected
