"""What every method promises, checked in-process on a tiny fp32 Llama with an NF4 base:

- a fresh adapter gives the base's logits exactly (methods that change the sequence excepted:
  prompt and prefix tuning add virtual tokens, so there is no "same logits" to compare);
- gradients reach the method's parameters and nothing else;
- training steps leave the NF4 base bytes unchanged;
- the saved artifact loads back into a fresh model with the same logits;
- resuming from the trainer's own checkpoint (save_checkpoint / restore) is bit-exact.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from qtrain.config import recipe_from_dict
from qtrain.distributed.env import DistEnv
from qtrain.models.load import load_model
from qtrain.peft.artifact import read_adapter
from qtrain.peft.method import ArtifactContext
from qtrain.peft.registry import METHODS, get_method
from qtrain.peft.sequence import model_logits
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec
from qtrain.train.checkpointing import save_checkpoint
from qtrain.train.faults import FaultPlan
from qtrain.train.loop import RunState, train_step
from qtrain.train.run import _resume
from qtrain.train.setup import prepare
from method_cases import TINY_PEFT, perturb

CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
ADAPTERS = [m for m in METHODS if m != "full"]


@pytest.fixture(autouse=True)
def _own_rng():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@functools.lru_cache(maxsize=None)
def _loaded(base_dir: Path, method: str | None):
    opts = get_method(method).load_options(_cfg(method), torch.float32, True) if method else None
    return load_model(base_dir, torch.float32, CPU, NF4Spec(64, True), dense=opts.dense if opts else None)


def _model(base_dir, method: str | None = None, inject: bool = True):
    """The tiny NF4 base loaded as `method` loads it (layer freezing: its blocks dense; loaded once, copied),
    with the method attached."""
    model = copy.deepcopy(_loaded(base_dir, method))
    if method and inject:
        get_method(method).inject(model, _cfg(method))
    return model


def _cfg(method: str):
    from method_cases import peft_config

    return peft_config(method)


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model_logits(model, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)})


def _nf4_bytes(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in model.named_modules() if isinstance(m, NF4Linear)
            for k, v in (("packed", m.nf4.packed), ("absmax", m.nf4.absmax))}


@pytest.mark.parametrize("method", ADAPTERS)
def test_fresh_adapter_gradients_and_artifact_round_trip(method, tiny_base_dir, tmp_path):
    m = get_method(method)
    model = _model(tiny_base_dir, method)
    # 1. A fresh adapter is the base, as the method loads it (layer freezing: its blocks dense), bit for bit;
    #    prompt and prefix tuning add virtual positions, so there is no "same logits" to compare.
    if not m.needs_padded_batches:
        assert torch.equal(_logits(model), _logits(_model(tiny_base_dir, method, inject=False)))
    # 2. Gradients reach the method's parameters, all of them, and nothing else.
    base_names = {n for n, _ in _model(tiny_base_dir).named_parameters()}
    perturb(model)
    model.train()
    model_logits(model, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}).float().pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert trainable and with_grad == trainable
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    selected = {n for n in trainable if n in base_names}  # base weights a selective method trains
    assert not selected or method == "freeze", selected
    # 3. The saved artifact loads back into a fresh model with the same logits.
    trained = _logits(model)
    m.save_artifact(model, ArtifactContext(_cfg(method), str(tiny_base_dir)), tmp_path / "adapter")
    config, tensors = read_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) == config
    fresh = _model(tiny_base_dir, method)
    m.load_state(fresh, tensors)
    assert torch.equal(_logits(fresh), trained)
    assert not torch.equal(trained, _logits(_model(tiny_base_dir, method)))


def _recipe(base_dir: Path, data: Path, out: Path, method: str) -> dict:
    return {"output_dir": str(out), "seed": 0, "model": {"path": str(base_dir), "dtype": "float32"},
            "quant": {"method": "none" if method == "full" else "nf4"},
            "peft": {"method": method, **TINY_PEFT[method], **({"dropout": 0.1} if method in ("lora", "dora") else {})},
            "data": {"path": str(data), "format": "instruction", "max_len": 48, "packing": False, "eval_split": 0.0},
            "train": {"micro_batch_size": 2, "grad_accum": 2, "lr": 1e-2, "max_steps": 4, "warmup_steps": 1,
                      "optimizer": "adamw", "gradient_checkpointing": method in ("dora", "prefix_tuning"),
                      "num_threads": 1},
            "checkpoint": {"every_steps": 2}, "logging": {"progress": False}}


def _steps(s, stream, state: RunState, n: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(n):
        result = train_step(s, [next(stream) for _ in range(s.recipe.train.grad_accum)])
        state.step += 1
        out.append((result.loss, result.grad_norm))
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = (Path(__file__).resolve().parents[2] / "data" / "quickstart" / "train.jsonl").read_text().splitlines()
    path.write_text("\n".join(lines[:24]) + "\n")
    return path


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_from_the_trainers_checkpoint_is_bit_exact_and_the_base_bytes_stay(method, tiny_base_dir, rows,
                                                                                  tmp_path):
    data = _recipe(tiny_base_dir, rows, tmp_path / "run", method)
    s = prepare(recipe_from_dict(data), DistEnv())
    nf4_before = _nf4_bytes(s.model)
    stream = s.data.train_stream(2, 0, 0, 1)
    state = RunState()
    first = _steps(s, stream, state, 2)
    save_checkpoint(s, state.to_json(), stream, FaultPlan(0))
    rest = _steps(s, stream, state, 2)
    final = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    nf4_after = _nf4_bytes(s.model)
    assert nf4_before.keys() == nf4_after.keys() and all(torch.equal(nf4_before[k], nf4_after[k]) for k in nf4_before)
    assert all(torch.isfinite(torch.tensor(loss)) for loss, _ in first + rest)

    torch.manual_seed(123)  # a resumed process starts from another RNG state; restore must replace it
    s2 = prepare(recipe_from_dict(data), DistEnv())
    stream2 = s2.data.train_stream(2, 0, 0, 1)
    state2 = _resume(s2, tmp_path / "run" / "checkpoints" / "step-2", stream2, tmp_path / "run" / "metrics.jsonl")
    assert state2.step == 2
    assert _steps(s2, stream2, state2, 2) == rest
    for n, p in s2.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, final[n]), n
