"""`merge_to_dir`: the written dir loads in plain transformers and equals base + adapter."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.infer.load import BaseOptions, load_with_adapters
from qtrain.infer.merge import MARKER, MergeOptions, merge_to_dir
from qtrain.models.build import write_random_base
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from qtrain.quant.nf4 import NF4Spec
from lora_helpers import randomize_lora_b

CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
FP32 = BaseOptions(dtype=torch.float32, quant=None)
NF4_FP32 = BaseOptions(dtype=torch.float32, quant=NF4Spec(64, True))


@pytest.fixture(scope="module")
def adapter_dir(tiny_base_dir, tmp_path_factory) -> str:
    model = load_model(tiny_base_dir, torch.float32, CPU, None)
    cfg = PeftConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    inject_lora(model, cfg)
    randomize_lora_b(model, seed=5, std=0.1)
    return str(save_adapter(model, cfg, str(tiny_base_dir), tmp_path_factory.mktemp("merge") / "adapter"))


def _with_adapter(adapter_dir, opts: BaseOptions):
    model, *_ = load_with_adapters({"a": adapter_dir}, None, opts)
    return model


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def test_fp32_merge_loads_in_transformers_sharded_and_equals_base_plus_adapter(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    report = merge_to_dir(MergeOptions(adapter_dir, str(out), "fp32", None, FP32, max_shard_size="150KB"))
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert (out / "tokenizer.json").is_file() and json.loads((out / MARKER).read_text()) == report
    assert report["merged_layers"] == 8 and report["probe_max_abs_logit_diff"] < 1e-4
    reference = _logits(_with_adapter(adapter_dir, FP32))
    torch.testing.assert_close(_logits(_hf(out)), reference, rtol=1e-5, atol=1e-5)


def test_bf16_merge_is_the_fp32_merge_rounded_once(adapter_dir, tmp_path):
    merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "fp32"), "fp32", None, FP32))
    merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "bf16"), "bf16", None, FP32))
    exact, rounded = _hf(tmp_path / "fp32"), _hf(tmp_path / "bf16", torch.bfloat16)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = dict(rounded.named_parameters())
    for name, p in exact.named_parameters():
        assert theirs[name].dtype == torch.bfloat16
        assert torch.equal(theirs[name], p.to(torch.bfloat16)), name   # one rounding, fp32 sum before it
    # Logits of the bf16 weights (run in fp32) stay within bf16 weight rounding (2^-9 relative per weight).
    reference = _logits(_with_adapter(adapter_dir, FP32))
    rel = float((_logits(rounded.float()) - reference).norm() / reference.norm())
    assert 0 < rel < 2 ** -7


def test_merge_from_the_nf4_base_equals_the_4bit_model_with_the_adapter(adapter_dir, tmp_path):
    report = merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "m"), "fp32", None, NF4_FP32))
    assert report["base_weights"] == "nf4-dequantized"
    reference = _logits(_with_adapter(adapter_dir, NF4_FP32))
    torch.testing.assert_close(_logits(_hf(tmp_path / "m")), reference, rtol=1e-5, atol=1e-5)
    # and it is not simply the unquantized merge
    assert not torch.allclose(reference, _logits(_with_adapter(adapter_dir, FP32)), atol=1e-3)


def test_merge_refuses_nf4_output_a_foreign_out_dir_and_a_mismatched_base(adapter_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="rounds every weight a second time"):
        merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "q"), "nf4", None, FP32))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a merge qtrain wrote"):
        merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "busy"), "fp32", None, FP32))
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    other = write_random_base({"model_type": "llama", "hidden_size": 32, "intermediate_size": 160,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
                              tokenizer, 0, torch.float32, tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"q_proj\.lora_A\.weight has shape \(8, 64\)"):
        merge_to_dir(MergeOptions(adapter_dir, str(tmp_path / "x"), "fp32", str(other), FP32))
    assert not (tmp_path / "x").exists()
