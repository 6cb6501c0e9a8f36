"""Kernel tests run the real Triton code: compiled on a CUDA machine, in Triton's interpreter on CPU.

`@triton.jit` decides between compiling and interpreting when it runs, i.e. when a
`qtrain_kernels.triton` module is first imported. So on a machine without CUDA, TRITON_INTERPRET
is set first thing here and the kernel modules are imported under it. The variable is then
restored: left set, it would leak into every later test's subprocesses (tests/integration checks
that `kernels=triton` is refused on a CPU-only machine). An autouse fixture sets it again around
each test in this directory, where `qtrain_kernels.dispatch` reads it to route CPU tensors to
the interpreter.
"""

import os

_PREVIOUS = os.environ.get("TRITON_INTERPRET")

import torch  # noqa: E402  (torch does not import triton)

INTERPRET = not torch.cuda.is_available()
KERNEL_MODULES = ("nf4_dequant", "lora_matmul", "gemv_nf4", "fused_ce")

if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

import pytest  # noqa: E402


def _import_kernels() -> bool:
    """Import every kernel module now (under the interpreter on CPU); False without triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import qtrain_kernels.triton as package

    # Modules imported earlier in this session (e.g. by another test directory) were jitted for
    # the wrong mode: drop them, and the package attributes that would shadow a re-import.
    for name in KERNEL_MODULES:
        sys.modules.pop(f"qtrain_kernels.triton.{name}", None)
        if hasattr(package, name):
            delattr(package, name)
    import importlib

    for name in KERNEL_MODULES:
        importlib.import_module(f"qtrain_kernels.triton.{name}")
    return True


HAVE_TRITON = _import_kernels()

if INTERPRET:
    if _PREVIOUS is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS

if not HAVE_TRITON:  # only the dispatch tests make sense without triton
    collect_ignore_glob = ["test_[!d]*.py"]


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
