"""`kernels: auto|triton|torch` resolution, and the package importing without triton."""

import subprocess
import sys

import pytest
import torch

from qtrain_kernels import dispatch


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _no_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_import_error", lambda: "ModuleNotFoundError: No module named 'triton'")


def test_triton_under_interpreter_resolves(no_cuda, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("triton") == "triton"
    assert "triton" in dispatch.available_backends()
    # auto never picks the interpreter: it is for tests, far too slow to train with
    assert dispatch.resolve("auto") in ("bnb", "reference")


def test_triton_without_cuda_names_what_is_missing(no_cuda, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernels=triton: no CUDA device.*TRITON_INTERPRET.*kernels=torch"):
        dispatch.resolve("triton")
    assert dispatch.resolve("auto") in ("bnb", "reference")


def test_triton_without_the_package_names_it(monkeypatch):
    _no_triton(monkeypatch)
    with pytest.raises(ValueError, match="`triton` package does not import.*pip install triton"):
        dispatch.resolve("triton")
    assert dispatch.resolve("auto") in ("bnb", "reference")
    assert not dispatch.use_triton("triton", torch.zeros(1))


def test_auto_stays_on_the_torch_path_on_cuda_until_the_kernels_are_gpu_validated(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dispatch.resolve("auto") in ("bnb", "reference")
    assert dispatch.resolve("triton") == "triton"  # explicit opt-in works
    assert dispatch.resolve("torch") in ("bnb", "reference")
    with pytest.raises(ValueError, match="expected auto, triton or torch"):
        dispatch.resolve("cuda")


def test_use_triton_follows_the_tensor(no_cuda, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton("triton", torch.zeros(1))
    assert not dispatch.use_triton("bnb", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.use_triton("triton", torch.zeros(1))


def test_importing_the_package_does_not_import_triton():
    code = ("import sys; import qtrain_kernels, qtrain_kernels.dispatch, qtrain_kernels.lora_linear, "
            "qtrain_kernels.fused_ce, qtrain_kernels.triton; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
