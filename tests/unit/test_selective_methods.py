"""Layer freezing and diff pruning: what is particular to each (the shared properties are in
test_method_properties.py)."""

import pytest
import torch
from torch import nn

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.load import load_model
from qtrain.peft.diff_pruning import DiffPruning, diff_modules, gate, open_probability
from qtrain.peft.freeze import Freeze
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec

CPU = torch.device("cpu")


def _load(base_dir, cfg: PeftConfig, method):
    model = load_model(base_dir, torch.float32, CPU, NF4Spec(64, True),
                       dense=method.load_options(cfg, torch.float32, True).dense)
    return model, method.inject(model, cfg)


@pytest.mark.parametrize("cfg,expected", [(PeftConfig(method="freeze", layers_to_train=1), ["model.layers.1"]),
                                          (PeftConfig(method="freeze", layer_range=[0, 2]),
                                           ["model.layers.0", "model.layers.1"])])
def test_freeze_trains_its_blocks_dense_in_fp32_and_keeps_the_rest_nf4(tiny_base_dir, cfg, expected):
    model, names = _load(tiny_base_dir, cfg, Freeze())
    assert names == expected
    for name, mod in model.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            trained = any(name.startswith(b + ".") for b in names)
            assert isinstance(mod, nn.Linear) == trained and isinstance(mod, NF4Linear) != trained, name
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(n.startswith(b + ".") for b in names) for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())


def test_freeze_refuses_more_blocks_than_the_model_has(tiny_base_dir):
    with pytest.raises(ConfigError, match=r"peft.layers_to_train: 3, but model.layers has 2 blocks"):
        _load(tiny_base_dir, PeftConfig(method="freeze", layers_to_train=3), Freeze())
    with pytest.raises(ConfigError, match=r"peft.layer_range: \[1, 5\] reaches past the model's 2 blocks"):
        _load(tiny_base_dir, PeftConfig(method="freeze", layer_range=[1, 5]), Freeze())


def test_hard_concrete_gate_is_a_clamped_sample_and_its_median_in_eval():
    torch.manual_seed(0)
    log_alpha = torch.linspace(-6, 6, 1000)
    z = gate(log_alpha, training=True)
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0 and 0 < float(((z > 0) & (z < 1)).float().mean()) < 1
    det = gate(log_alpha, training=False)
    assert torch.equal(det, gate(log_alpha, training=False)) and bool((det[:100] == 0).all() and (det[-100:] == 1).all())
    # P(z != 0) is the L0 penalty's summand: check it against the sampled gates' open fraction
    for value in (-3.0, -1.0, 0.5, 2.0):
        samples = gate(torch.full((40_000,), value), training=True)
        assert float((samples > 0).float().mean()) == pytest.approx(float(open_probability(torch.tensor(value))),
                                                                    abs=0.01)


def test_diff_pruning_saves_the_largest_entries_up_to_the_target_and_reports_the_sparsity(tiny_base_dir):
    cfg = PeftConfig(method="diff_pruning", target_sparsity=0.9, targets=["q_proj"])
    model, names = _load(tiny_base_dir, cfg, DiffPruning())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in diff_modules(model).values():
            mod.delta.copy_(torch.randn(mod.delta.shape, generator=g))
            mod.log_alpha.view(-1)[::2] = -10.0  # half the gates closed: those entries are never kept
    state = DiffPruning().artifact_state(model)
    for name, mod in diff_modules(model).items():
        idx, val = state[f"base_model.model.{name}.diff_indices"], state[f"base_model.model.{name}.diff_values"]
        assert idx.dtype == torch.int64 and val.dtype == torch.float32
        assert idx.numel() == int(0.1 * mod.delta.numel()) and bool((idx % 2 == 1).all())
        kept = mod.delta.detach().flatten()[idx].abs()
        dropped = mod.delta.detach().flatten().abs()
        dropped[idx] = 0
        dropped.view(-1)[::2] = 0
        assert float(kept.min()) >= float(dropped.max())  # the largest open entries
        torch.testing.assert_close(val, mod.delta.detach().flatten()[idx], rtol=0, atol=0)
    report = DiffPruning().report(model)
    assert report["diff_sparsity"] == pytest.approx(0.9, abs=1e-3) and report["diff_nonzero"] > 0


def test_l0_penalty_pushes_only_while_the_expected_density_is_above_the_target(tiny_base_dir):
    model, _ = _load(tiny_base_dir, PeftConfig(method="diff_pruning", target_sparsity=0.5, l0_weight=2.0), DiffPruning())
    penalty = DiffPruning().penalty(model)  # gates start open: density ~1 > 0.5
    mods = list(diff_modules(model).values())
    density = sum(float(open_probability(m.log_alpha).sum()) for m in mods) / sum(m.log_alpha.numel() for m in mods)
    assert float(penalty) == pytest.approx(2.0 * (density - 0.5), rel=1e-6)
    penalty.backward()
    assert all(bool((m.log_alpha.grad > 0).all()) for m in mods)  # descent closes gates
    with torch.no_grad():
        for m in mods:
            m.log_alpha.fill_(-5.0)
    assert float(DiffPruning().penalty(model)) == 0.0
    model2, _ = _load(tiny_base_dir, PeftConfig(method="diff_pruning", l0_weight=0.0), DiffPruning())
    assert DiffPruning().penalty(model2) is None
