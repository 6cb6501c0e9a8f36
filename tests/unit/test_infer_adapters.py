"""Several adapters over one base: conversion, hot swap, disable, merge/unmerge, mixed-adapter batches."""

from __future__ import annotations

import pytest
import torch

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.infer.adapters import AdapterSet
from qtrain.infer.multi_lora import MultiLoRALinear, convert_lora_model
from qtrain.models.build import write_random_base
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from qtrain.quant.nf4 import NF4Spec
from lora_helpers import randomize_lora_b

CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
# Adapter "b" has another rank and fewer targets than "a": stacks pad ranks, layers without b skip it.
CONFIGS = {"a": PeftConfig(r=8, alpha=16), "b": PeftConfig(r=4, alpha=4, targets=["q_proj", "v_proj", "down_proj"])}


def _load(base_dir, quant: bool = False):
    return load_model(base_dir, torch.float32, CPU, NF4Spec(64, True) if quant else None)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_lora(base_dir, cfg: PeftConfig, seed: int):
    model = _load(base_dir)
    inject_lora(model, cfg)
    randomize_lora_b(model, seed=seed, std=0.05)
    return model


@pytest.fixture(scope="module")
def adapter_dirs(tiny_base_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1):
        out[name] = str(save_adapter(_trained_lora(tiny_base_dir, cfg, seed), cfg, str(tiny_base_dir), root / name))
    return out


@pytest.fixture(scope="module")
def single_logits(tiny_base_dir, adapter_dirs) -> dict[str, torch.Tensor]:
    """Reference logits of each adapter alone, through the training-side LoRALinear path."""
    from qtrain.checkpoint.adapter_io import read_adapter
    from qtrain.peft.lora import LoRA

    out = {None: _logits(_load(tiny_base_dir))}
    for name, path in adapter_dirs.items():
        config, tensors = read_adapter(path)
        model = _load(tiny_base_dir)
        inject_lora(model, LoRA().config_from_artifact(config))
        LoRA().load_state(model, tensors)
        out[name] = _logits(model)
    return out


def _set(base_dir, adapter_dirs, quant: bool = False) -> AdapterSet:
    aset = AdapterSet(_load(base_dir, quant))
    for name, path in adapter_dirs.items():
        aset.add_adapter(name, path)
    return aset


def test_converting_lora_layers_keeps_the_logits_bit_for_bit(tiny_base_dir):
    model = _trained_lora(tiny_base_dir, CONFIGS["a"], 1)
    before = _logits(model)
    layers = convert_lora_model(model, "a")
    assert len(layers) == 14 and all(isinstance(m, MultiLoRALinear) for m in layers.values())
    for layer in layers.values():
        layer.active = "a"
    assert torch.equal(_logits(model), before)


def test_each_adapter_equals_the_lora_path_and_swapping_back_is_exact(tiny_base_dir, adapter_dirs, single_logits):
    aset = _set(tiny_base_dir, adapter_dirs)
    assert aset.names == ["a", "b"] and aset.active is None
    assert torch.equal(_logits(aset.model), single_logits[None])
    aset.set_adapter("a")
    first = _logits(aset.model)
    assert torch.equal(first, single_logits["a"])
    aset.set_adapter("b")
    assert torch.equal(_logits(aset.model), single_logits["b"])
    aset.set_adapter("a")
    assert torch.equal(_logits(aset.model), first)
    assert not torch.allclose(single_logits["a"], single_logits["b"], atol=1e-3)


def test_disable_adapters_gives_the_base_and_restores_the_active_one(tiny_base_dir, adapter_dirs, single_logits):
    aset = _set(tiny_base_dir, adapter_dirs)
    aset.set_adapter("b")
    with aset.disable_adapters():
        assert torch.equal(_logits(aset.model), single_logits[None])
    assert torch.equal(_logits(aset.model), single_logits["b"])


@pytest.mark.parametrize("quant,method", [(False, "concat"), (False, "gather"), (True, "auto")])
def test_mixed_batch_rows_equal_single_adapter_runs(tiny_base_dir, adapter_dirs, quant, method):
    aset = _set(tiny_base_dir, adapter_dirs, quant)
    singles = {}
    for name in ("a", "b"):
        aset.set_adapter(name)
        singles[name] = _logits(aset.model)
    aset.set_adapter(None)
    singles[None] = _logits(aset.model)
    rows = ["b", None, "a"]
    with aset.use_adapters(rows, method):
        mixed = _logits(aset.model)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], singles[name][i], rtol=1e-5, atol=1e-5)
    # A row without an adapter goes through the same base GEMM plus exact zeros: the base, bit for bit.
    assert torch.equal(mixed[1], singles[None][1])
    # The route is gone after the block.
    assert torch.equal(_logits(aset.model), singles[None])


def test_mixed_route_with_one_adapter_for_all_rows_is_the_single_path(tiny_base_dir, adapter_dirs, single_logits):
    aset = _set(tiny_base_dir, adapter_dirs)
    with aset.use_adapters(["a", "a", "a"]):
        assert torch.equal(_logits(aset.model), single_logits["a"])


def test_merge_matches_and_unmerge_restores_the_base_exactly(tiny_base_dir, adapter_dirs, single_logits):
    aset = _set(tiny_base_dir, adapter_dirs)
    weights = {n: p.detach().clone() for n, p in aset.model.named_parameters()}
    aset.set_adapter("a")
    aset.merge()
    assert aset.merged == "a"
    torch.testing.assert_close(_logits(aset.model), single_logits["a"], rtol=1e-5, atol=1e-5)
    changed = [n for n, p in aset.model.named_parameters() if not torch.equal(p, weights[n])]
    assert len(changed) == 14 and all("base_layer.weight" in n for n in changed)
    with pytest.raises(ConfigError, match="unmerge"):
        aset.set_adapter("b")
    aset.unmerge()
    assert aset.merged is None
    for n, p in aset.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert torch.equal(_logits(aset.model), single_logits["a"])


def test_merge_into_a_4bit_base_is_refused(tiny_base_dir, adapter_dirs):
    aset = _set(tiny_base_dir, adapter_dirs, quant=True)
    aset.set_adapter("a")
    with pytest.raises(ConfigError, match="NF4"):
        aset.merge()


def test_bad_adapters_and_names_are_typed_errors(tiny_base_dir, adapter_dirs, tokenizer, tmp_path):
    aset = AdapterSet(_load(tiny_base_dir))
    with pytest.raises(CheckpointError, match="adapter dir not found"):
        aset.add_adapter("x", tmp_path / "nope")
    with pytest.raises(ConfigError, match="letters, digits"):
        aset.add_adapter("bad.name", adapter_dirs["a"])
    with pytest.raises(ConfigError, match="'zzz' is not loaded"):
        aset.set_adapter("zzz")
    other = write_random_base({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                              tokenizer, 0, torch.float32, tmp_path / "other")
    wrong = AdapterSet(_load(other))
    with pytest.raises(CheckpointError) as info:
        wrong.add_adapter("a", adapter_dirs["a"])
    msg = str(info.value)
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight" in msg and "different base" in msg
    assert wrong.names == [] and not any(isinstance(m, MultiLoRALinear) and m.adapters for m in wrong.model.modules())
