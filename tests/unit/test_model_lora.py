"""Whole-model checks: injection counts, a fresh adapter leaves the logits alone, peft loads our adapter."""

import json

import pytest
import torch

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec
from lora_helpers import randomize_lora_b

CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def _load(base_dir, quant: bool, dtype=torch.float32):
    return load_model(base_dir, dtype, CPU, NF4Spec(64, True) if quant else None)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomize_b(model, seed: int = 1):
    randomize_lora_b(model, seed, std=0.05)


def test_default_targets_wrap_seven_linears_per_layer(tiny_base_dir):
    model = _load(tiny_base_dir, quant=True)
    names = inject_lora(model, PeftConfig(r=4))
    n_layers = model.config.num_hidden_layers
    assert len(names) == 7 * n_layers
    for i in range(n_layers):
        layer = [n for n in names if f"layers.{i}." in n]
        assert sorted(n.rsplit(".", 1)[-1] for n in layer) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not isinstance(model.lm_head, NF4Linear) and model.lm_head.weight.dtype == torch.float32


def test_regex_targets_and_list_suffixes(tiny_base_dir):
    model = _load(tiny_base_dir, quant=False)
    names = inject_lora(model, PeftConfig(r=4, targets=r".*layers\.1\.self_attn\.(q|v)_proj"))
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = _load(tiny_base_dir, quant=False)
    assert len(inject_lora(model, PeftConfig(r=4, targets=["v_proj"]))) == model.config.num_hidden_layers


def test_targets_matching_nothing_is_a_config_error_naming_the_layers(tiny_base_dir):
    model = _load(tiny_base_dir, quant=True)
    with pytest.raises(ConfigError, match="peft.targets") as info:
        inject_lora(model, PeftConfig(targets=["qkv_proj"]))
    assert "q_proj" in str(info.value) and "down_proj" in str(info.value)


@pytest.mark.parametrize("quant", [False, True])
def test_fresh_adapter_gives_the_base_logits_exactly(tiny_base_dir, quant):
    base = _logits(_load(tiny_base_dir, quant))
    model = _load(tiny_base_dir, quant)
    inject_lora(model, PeftConfig(r=8))
    assert torch.equal(_logits(model), base)
    _randomize_b(model)
    assert not torch.allclose(_logits(model), base)


def test_nf4_model_is_close_to_the_bf16_model(tiny_base_dir):
    """Quantization error at model level stays NF4-sized (catches a broken layout or scale)."""
    full = _logits(_load(tiny_base_dir, quant=False))
    q = _logits(_load(tiny_base_dir, quant=True))
    rel = float((full - q).norm() / full.norm())
    assert 0.0 < rel < 0.2


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_and_gives_the_same_logits(tiny_base_dir, tmp_path, rslora):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ours = _load(tiny_base_dir, quant=False)
    cfg = PeftConfig(r=8, alpha=16, rslora=rslora)
    inject_lora(ours, cfg)
    _randomize_b(ours)
    save_adapter(ours, cfg, str(tiny_base_dir), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base_dir) and config["use_rslora"] is rslora

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    hf.eval()
    with torch.no_grad():
        theirs = hf(input_ids=IDS).logits
    torch.testing.assert_close(_logits(ours), theirs, rtol=1e-5, atol=1e-5)
    # the adapter really changes the output, so equality above is not the trivial base==base
    assert not torch.allclose(theirs, _logits(_load(tiny_base_dir, quant=False)), atol=1e-3)


def test_peft_with_bitsandbytes_4bit_gives_our_nf4_logits(tiny_aligned_base_dir, tmp_path):
    """Same NF4 bytes, same adapter: peft + bitsandbytes on the 4-bit base agrees with us."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_base_dir = tiny_aligned_base_dir
    ours = _load(tiny_base_dir, quant=True)
    cfg = PeftConfig(r=8, alpha=16)
    inject_lora(ours, cfg)
    _randomize_b(ours)
    save_adapter(ours, cfg, str(tiny_base_dir), tmp_path / "adapter")
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32,
                                              quantization_config=bnb_cfg, device_map={"": "cpu"})
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    # bitsandbytes' CPU *inference* path repacks weights and fails on tiny shapes; train mode
    # uses its plain 4-bit matmul. Every dropout here is 0, so train mode computes the same function.
    hf.train()
    with torch.no_grad():
        theirs = hf(input_ids=IDS).logits
    torch.testing.assert_close(_logits(ours), theirs, rtol=1e-5, atol=1e-5)
