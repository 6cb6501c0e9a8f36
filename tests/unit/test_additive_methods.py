"""Bottleneck adapters and compacter: placements, the PHM weight, the shared rules (the shared
properties are in test_method_properties.py)."""

import pytest
import torch

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.load import load_model
from qtrain.peft.bottleneck import BottleneckLinear, ParallelAdapters, BottleneckAdapters
from qtrain.peft.compacter import CompacterAdapter, PHMLinear, rules_of
from qtrain.peft.registry import get_method
from method_cases import perturb

CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
DEC = torch.randint(3, 1000, (2, 5), generator=torch.Generator().manual_seed(1))


def _load(base_dir, method: str, **cfg):
    model = load_model(base_dir, torch.float32, CPU, None)
    names = get_method(method).inject(model, PeftConfig(method=method, reduction_factor=8, **cfg))
    return model, names


@pytest.mark.parametrize("placement,leaves", [("houlsby", ["self_attn.o_proj", "mlp.down_proj"]),
                                              ("pfeiffer", ["mlp.down_proj"]), ("parallel", ["mlp"])])
def test_placements_wrap_the_spec_sites_of_every_block(tiny_base_dir, placement, leaves):
    model, names = _load(tiny_base_dir, "bottleneck", placement=placement)
    assert names == [f"model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves]
    assert set(BottleneckAdapters().adapters(model)) == set(names)
    kind = ParallelAdapters if placement == "parallel" else BottleneckLinear
    assert all(isinstance(model.get_submodule(n if kind is BottleneckLinear else n + ".parallel_adapters"), kind)
               for n in names)


def test_t5_houlsby_adapts_self_and_cross_attention_and_the_ffn_and_starts_as_the_base(tiny_t5_base_dir):
    base = load_model(tiny_t5_base_dir, torch.float32, CPU, None)
    with torch.no_grad():
        expected = base(input_ids=IDS, decoder_input_ids=DEC).logits
    for method in ("bottleneck", "compacter"):
        model, names = _load(tiny_t5_base_dir, method, placement="houlsby")
        assert "decoder.block.1.layer.1.EncDecAttention.o" in names and "encoder.block.0.layer.1.DenseReluDense.wo" in names
        assert len(names) == 2 * 2 + 2 * 3  # encoder: self o + wo; decoder: self o + cross o + wo
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS, decoder_input_ids=DEC).logits, expected)
            perturb(model)
            assert not torch.allclose(model(input_ids=IDS, decoder_input_ids=DEC).logits, expected, atol=1e-4)


def test_parallel_adapter_adds_its_output_to_the_ffn_of_the_same_input(tiny_base_dir):
    model, _ = _load(tiny_base_dir, "bottleneck", placement="parallel", activation="gelu")
    perturb(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    ad = mlp.parallel_adapters.adapters["default"]
    ffn = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    expected = ffn + ad.adapter_up(torch.nn.functional.gelu(ad.adapter_down(x)))
    torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)


def test_phm_weight_is_the_sum_of_kronecker_products():
    n, rank = 4, 2
    layer = PHMLinear(n, 16, 8, rank, zero=False, device=CPU)
    rule = torch.randn(n, n, n, generator=torch.Generator().manual_seed(0))
    expected = sum(torch.kron(rule[i], layer.W_left[i] @ layer.W_right[i]) for i in range(n))
    torch.testing.assert_close(layer.weight(rule), expected, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x, rule), x @ expected + layer.b, rtol=1e-6, atol=1e-6)


def test_compacter_shares_one_rule_set_and_counts_few_parameters(tiny_base_dir):
    model, names = _load(tiny_base_dir, "compacter", phm_dim=4, phm_rank=1, placement="pfeiffer")
    adapters = list(BottleneckAdapters().adapters(model).values())
    assert len(adapters) == 2 and all(isinstance(a, CompacterAdapter) and a.rules is rules_of(model) for a in adapters)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = 2 * (4 * (64 // 4 + 8 // 4)) + 8 + 64  # two PHM layers (W_left, W_right) + biases
    assert trainable == len(names) * per_layer + 2 * 4 ** 3
    bottleneck, _ = _load(tiny_base_dir, "bottleneck", placement="pfeiffer")
    assert trainable < sum(p.numel() for p in bottleneck.parameters() if p.requires_grad)


def test_compacter_needs_phm_dim_to_divide_the_widths(tiny_base_dir):
    with pytest.raises(ConfigError, match=r"peft.phm_dim: 3 must divide the hidden size \(64\)"):
        _load(tiny_base_dir, "compacter", phm_dim=3)
