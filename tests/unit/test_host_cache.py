"""The caching allocator for CPU tensors (kernels/qtrain_kernels/host_cache.cpp) and train.host_allocator.

Each probe runs in a fresh process: the allocator, once installed, serves the rest of its process.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qtrain.errors import ConfigError
from qtrain.train.host_memory import choose_host_allocator

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not (shutil.which("c++") or shutil.which("g++")),
                                reason="the host cache is built on Linux with the system's C++ compiler")

_PRELUDE = """
import json, os, sys, threading
import torch
from qtrain_kernels import host_cache as hc
MiB = 1 << 20
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / MiB
def st():
    return hc.stats()
"""


def _probe(code: str, *args: str, extra_env: dict | None = None) -> dict:
    env = {**os.environ, **(extra_env or {})}
    done = subprocess.run([sys.executable, "-c", _PRELUDE + code, *args], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_freed_block_serves_the_next_request_of_its_size_and_nearly_its_size():
    out = _probe("""
hc.install()
a = torch.empty(MiB // 4, dtype=torch.float32)  # 1 MiB
ptr = a.data_ptr(); del a
b = torch.empty(MiB // 4); same = b.data_ptr() == ptr; del b
c = torch.empty(int(MiB // 4 * 0.85)); near = c.data_ptr() == ptr; del c  # within 1/4 over
d = torch.empty(MiB // 8); half = d.data_ptr() == ptr  # 2x over: a new block
s = st()
print(json.dumps({"same": same, "near": near, "half": half, "hits": s.hits, "misses": s.misses}))
""")
    assert out["same"] and out["near"] and not out["half"], out
    assert (out["hits"], out["misses"]) == (2, 2), out


def test_small_tensors_stay_with_the_system_allocator():
    out = _probe("""
hc.install()
before = st()
x = [torch.empty(1000) for _ in range(100)]  # 4000 bytes each, under the 64 KiB floor
after = st()
print(json.dumps({"misses": after.misses - before.misses, "hits": after.hits - before.hits, "live": after.live}))
""")
    assert out == {"misses": 0, "hits": 0, "live": 0}, out


def test_a_freed_block_over_the_live_high_water_is_unmapped():
    """8 MiB live alone, freed (cached 8 = the high-water); then 2 MiB, freed: keeping it would hold
    10 MiB free against a high-water of 8, so it is unmapped."""
    out = _probe("""
hc.install()
x = torch.ones(2 * MiB); del x
y = torch.ones(MiB // 2); del y
s = st()
print(json.dumps({"cached": s.cached, "peak_live": s.peak_live, "unmapped": s.unmapped}))
""")
    mib = 1 << 20
    assert out == {"cached": 8 * mib, "peak_live": 8 * mib, "unmapped": 2 * mib}, out


def test_a_new_block_first_evicts_the_least_recently_freed_and_release_gives_the_rest_back():
    """8 then 2 MiB live at once (high-water 10), freed in that order. A 4 MiB request fits no cached
    block; mapping it would hold 14 MiB against 1.25 x 10, so the oldest free block (8 MiB) goes
    first. release() unmaps the rest (2 + 4 MiB) and RSS falls by as much."""
    out = _probe("""
hc.install()
x, y = torch.ones(2 * MiB), torch.ones(MiB // 2)
del x, y
a = torch.ones(MiB); del a
s = st()
before = rss()
released = hc.release()
print(json.dumps({"cached": s.cached, "peak_live": s.peak_live, "unmapped": s.unmapped, "released": released,
                  "rss_drop_mib": before - rss(), "after": st().mapped}))
""")
    mib = 1 << 20
    assert out["peak_live"] == 10 * mib and out["unmapped"] == 8 * mib, out
    assert out["cached"] == out["released"] == 6 * mib, out
    assert out["rss_drop_mib"] > 5 and out["after"] == 0, out


def test_freed_large_tensors_do_not_stay_resident_behind_small_live_ones():
    """40 tensors of 4 MiB, each followed by a live 256 KiB one, then the big ones freed and the cache
    released: with the cache RSS falls back; served by glibc's heap (mmap threshold 16 MiB, as qtrain
    sets it), the live tensors above each hole keep them resident."""
    code = """
from qtrain.train.host_memory import fix_mmap_threshold
fix_mmap_threshold()
if sys.argv[1] == "cache":
    hc.install()
torch.ones(MiB)  # warm up the allocator's own structures
base = rss()
big, pins = [], []
for _ in range(40):
    big.append(torch.ones(MiB)); pins.append(torch.ones(64 * 1024))
del big
hc.release()
print(json.dumps({"kept_mib": rss() - base}))
"""
    cached, glibc = _probe(code, "cache")["kept_mib"], _probe(code, "glibc")["kept_mib"]
    assert cached < 30, (cached, glibc)
    assert glibc > 120, (cached, glibc)


def test_threads_and_a_fork_keep_its_books_straight():
    out = _probe("""
hc.install()
def churn():
    for i in range(300):
        t = torch.empty((i % 7 + 1) * 40000)
        del t
threads = [threading.Thread(target=churn) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
pid = os.fork()
if pid == 0:
    x = torch.ones(MiB); del x
    os._exit(0 if st().live == 0 else 3)
_, status = os.waitpid(pid, 0)
s = st()
print(json.dumps({"live": s.live, "child": os.waitstatus_to_exitcode(status), "calls": s.hits + s.misses}))
""")
    assert out == {"live": 0, "child": 0, "calls": 1200}, out


def test_onednn_scratch_memory_goes_through_the_raw_interface_both_ways():
    """oneDNN (torch's gelu, among others) allocates and frees through Allocator::raw_allocate /
    raw_deallocate: small scratch from the allocator it replaced, large from the cache."""
    out = _probe("""
hc.install()
for n in (1000, 5 * 64 * 1024, 3 * MiB):
    x = torch.randn(n)
    y = torch.nn.functional.gelu(x)
    torch.testing.assert_close(y, x * 0.5 * (1 + torch.erf(x / 2 ** 0.5)))
    del x, y
print(json.dumps({"live": st().live, "misses": st().misses}))
""")
    assert out["live"] == 0 and out["misses"] >= 2, out


def test_a_failed_build_is_a_config_error_for_caching_and_a_fallback_for_auto(tmp_path):
    code = """
from qtrain.train.host_memory import choose_host_allocator
from qtrain.errors import ConfigError
auto = choose_host_allocator("auto", torch.device("cpu"))
try:
    choose_host_allocator("caching", torch.device("cpu"))
    err = None
except ConfigError as exc:
    err = str(exc)
print(json.dumps({"auto": [auto.name, auto.reason], "caching": err, "installed": hc.installed()}))
"""
    out = _probe(code, extra_env={"CXX": str(tmp_path / "no-such-compiler"), "QTRAIN_KERNEL_CACHE": str(tmp_path)})
    assert out["auto"][0] == "system" and "unavailable" in out["auto"][1], out
    assert out["caching"] and "train.host_allocator: caching" in out["caching"], out
    assert "set train.host_allocator: system" in out["caching"], out
    assert not out["installed"] and not list(Path(tmp_path).glob("*.so")), out


def test_system_and_auto_on_a_gpu_leave_torch_alone():
    assert choose_host_allocator("system", torch.device("cpu")).name == "system"
    gpu = choose_host_allocator("auto", torch.device("cuda"))
    assert gpu.name == "system" and "cuda" in gpu.reason
    with pytest.raises(ConfigError, match="train.host_allocator"):
        from qtrain.config import recipe_from_dict

        recipe_from_dict({"output_dir": "x", "model": {"path": "m"}, "data": {"path": "d"},
                          "train": {"host_allocator": "jemalloc"}})
