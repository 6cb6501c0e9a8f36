"""peft as the oracle: the artifacts of the methods peft has load in `peft.PeftModel.from_pretrained` on
the same base and give our logits (fp32, 1e-5), on a Llama and on a T5 base."""

import json

import pytest
import torch

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.models.load import load_model
from qtrain.peft.registry import get_method
from method_cases import peft_config, perturb

peft = pytest.importorskip("peft")
CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
DEC = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "bitfit": "BEFT"}


def _base(arch, tiny_base_dir, tiny_t5_base_dir):
    return tiny_base_dir if arch == "llama" else tiny_t5_base_dir


def _hf(arch, base_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForCausalLM if arch == "llama" else AutoModelForSeq2SeqLM
    return cls.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def _logits(model, arch):
    with torch.no_grad():
        if arch == "llama":
            return model(input_ids=IDS).logits
        return model(input_ids=IDS, decoder_input_ids=DEC).logits


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("method", list(PEFT_TYPES))
def test_peft_loads_our_artifact_and_gives_our_logits(method, arch, tiny_base_dir, tiny_t5_base_dir, tmp_path):
    base_dir = _base(arch, tiny_base_dir, tiny_t5_base_dir)
    ours = load_model(base_dir, torch.float32, CPU, None)
    cfg = peft_config(method)
    get_method(method).inject(ours, cfg)
    perturb(ours)
    ours.eval()
    save_adapter(ours, cfg, str(base_dir), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[method] and "qtrain_method" not in config
    assert config["task_type"] == ("CAUSAL_LM" if arch == "llama" else "SEQ_2_SEQ_LM")

    theirs = peft.PeftModel.from_pretrained(_hf(arch, base_dir), str(tmp_path / "adapter")).eval()
    expected = _logits(theirs, arch)
    torch.testing.assert_close(_logits(ours, arch), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _logits(_hf(arch, base_dir), arch), atol=1e-3)  # the adapter matters
