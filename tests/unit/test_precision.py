"""`model.dtype: auto` picks the compute dtype from the device; fp16 brings dynamic loss scaling."""

from __future__ import annotations

import json
import os

import pytest
import torch

from qtrain.config import recipe_from_dict
from qtrain.models import precision as prec
from qtrain.models.precision import Precision, resolve_precision, storage_dtype
from qtrain.train.scaler import MAX_OVERFLOWS_IN_ROW, LossScaler
from qtrain.train.setup import autocast_dtype, needs_loss_scaling

CPU = torch.device("cpu")


def test_auto_on_a_cpu_without_native_bf16_computes_in_fp32(monkeypatch):
    monkeypatch.setattr(prec, "cpu_native_bf16", lambda: (False, "no AVX-512 BF16 or AMX"))
    p = resolve_precision("auto", CPU)
    assert p.dtype == torch.float32
    assert "no AVX-512 BF16 or AMX" in p.reason and p.reason.startswith("auto")


@pytest.mark.parametrize("evidence", ["AMX", "AVX-512 BF16"])
def test_auto_on_a_cpu_with_native_bf16_computes_in_bf16(monkeypatch, evidence):
    monkeypatch.setattr(prec, "cpu_native_bf16", lambda: (True, evidence))
    p = resolve_precision("auto", CPU)
    assert p.dtype == torch.bfloat16 and evidence in p.reason


@pytest.mark.parametrize("capability,dtype", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = resolve_precision("auto", torch.device("cuda", 0))
    assert p.dtype == dtype
    assert f"{capability[0]}.{capability[1]}" in p.reason


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float32", torch.float32)])
def test_an_explicit_dtype_is_used_as_given(name, dtype):
    p = resolve_precision(name, CPU)
    assert p.dtype == dtype and name in p.reason
    assert storage_dtype(name) == dtype


def test_auto_writes_random_bases_in_bf16_on_every_machine():
    assert storage_dtype("auto") == torch.bfloat16


def test_the_cpu_probe_agrees_with_the_kernel_flags():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native, _ = prec.cpu_native_bf16()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert native
    elif flags:
        assert not native


def _recipe(**train) -> object:
    return recipe_from_dict({"output_dir": "x", "model": {"path": "m"}, "data": {"path": "d.jsonl"},
                             "train": train})


@pytest.mark.parametrize("mode,dtype,expected", [
    ("auto", torch.bfloat16, torch.bfloat16), ("auto", torch.float16, torch.float16), ("auto", torch.float32, None),
    ("on", torch.float32, torch.bfloat16), ("on", torch.float16, torch.float16), ("off", torch.bfloat16, None),
])
def test_autocast_follows_the_compute_dtype(mode, dtype, expected):
    assert autocast_dtype(_recipe(autocast=mode), Precision(dtype, "test")) == expected


def test_only_fp16_compute_is_loss_scaled():
    assert needs_loss_scaling(Precision(torch.float16, "t"), torch.float16)
    assert needs_loss_scaling(Precision(torch.float32, "t"), torch.float16)
    assert not needs_loss_scaling(Precision(torch.bfloat16, "t"), torch.bfloat16)
    assert not needs_loss_scaling(Precision(torch.float32, "t"), None)


def _one_step(scaler: LossScaler, factor: float) -> tuple[bool, torch.nn.Linear]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = layer(torch.randn(4, 8)).float().pow(2).mean()
    scaler.scale(loss * factor).backward()
    scaler.unscale(opt)
    norm = float(torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0))
    overflow = scaler.overflowed(bool(torch.isfinite(loss)), norm == norm and norm != float("inf"))
    scaler.step(opt, apply=not overflow)
    return overflow, (before, layer.weight.detach())


def test_an_overflow_skips_the_update_and_halves_the_scale():
    scaler = LossScaler(True, CPU)
    assert scaler.get_scale() == 65536.0
    overflow, (before, after) = _one_step(scaler, 2.0 ** 100)
    assert overflow and torch.equal(before, after)
    assert scaler.get_scale() == 32768.0 and scaler.overflows_in_row == 1 and not scaler.collapsed
    overflow, (before, after) = _one_step(scaler, 1.0)
    assert not overflow and not torch.equal(before, after)
    assert scaler.overflows_in_row == 0


def test_a_collapsing_scale_is_reported():
    scaler = LossScaler(True, CPU)
    for _ in range(MAX_OVERFLOWS_IN_ROW):
        assert scaler.overflowed(True, False)
    assert scaler.collapsed


def test_scaler_state_round_trips_through_json():
    a = LossScaler(True, CPU)
    _one_step(a, 2.0 ** 100)
    state = json.loads(json.dumps(a.state_dict()))
    b = LossScaler(True, CPU)
    b.load_state_dict(state)
    assert b.get_scale() == a.get_scale() == 32768.0 and b.overflows_in_row == 1


def test_a_disabled_scaler_is_the_identity():
    scaler = LossScaler(False, CPU)
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert not scaler.overflowed(True, False)
