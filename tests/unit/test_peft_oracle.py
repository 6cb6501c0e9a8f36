"""peft as the oracle: the artifacts of the methods peft has load in `peft.PeftModel.from_pretrained` on
the same base and give our logits (fp32, 1e-5), on a Llama (grouped-query attention: 4 heads, 2 for
keys/values) and on a T5 base (every method but prefix tuning, which qtrain refuses for T5)."""

import json

import pytest
import torch

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.models.load import load_model
from qtrain.peft.registry import get_method
from qtrain.peft.sequence import model_logits
from method_cases import peft_config, perturb

peft = pytest.importorskip("peft")
CPU = torch.device("cpu")
IDS = torch.randint(3, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
DEC = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "bitfit": "BEFT", "prompt_tuning": "PROMPT_TUNING",
              "prefix_tuning": "PREFIX_TUNING"}
CASES = [(m, a) for m in PEFT_TYPES for a in ("llama", "t5") if (m, a) != ("prefix_tuning", "t5")]


def _base(arch, tiny_base_dir, tiny_t5_base_dir):
    return tiny_base_dir if arch == "llama" else tiny_t5_base_dir


def _hf(arch, base_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForCausalLM if arch == "llama" else AutoModelForSeq2SeqLM
    return cls.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def _logits(model, arch, ours: bool = True):
    """Logits per real token: ours through the sequence hook; peft's with a prompt-tuned causal LM's
    virtual positions cut off (peft returns them)."""
    kwargs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    if arch == "t5":
        kwargs["decoder_input_ids"] = DEC
    with torch.no_grad():
        if ours:
            return model_logits(model, kwargs)
        logits = model(**kwargs).logits
    return logits[:, logits.shape[1] - IDS.shape[1]:] if arch == "llama" else logits


@pytest.mark.parametrize("method,arch", CASES)
def test_peft_loads_our_artifact_and_gives_our_logits(method, arch, tiny_base_dir, tiny_t5_base_dir, tmp_path):
    base_dir = _base(arch, tiny_base_dir, tiny_t5_base_dir)
    ours = load_model(base_dir, torch.float32, CPU, None)
    cfg = peft_config(method)
    with torch.random.fork_rng(devices=[]):  # inits draw from the global RNG: the same adapter in any test order
        torch.manual_seed(0)
        get_method(method).inject(ours, cfg)
    perturb(ours)
    ours.eval()
    save_adapter(ours, cfg, str(base_dir), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[method] and "qtrain_method" not in config
    assert config["task_type"] == ("CAUSAL_LM" if arch == "llama" else "SEQ_2_SEQ_LM")

    theirs = peft.PeftModel.from_pretrained(_hf(arch, base_dir), str(tmp_path / "adapter")).eval()
    expected = _logits(theirs, arch, ours=False)
    # fp32 roundoff scales with the logits' magnitude (T5's untied head gives ~40): 1e-6 of the largest.
    torch.testing.assert_close(_logits(ours, arch), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert not torch.allclose(expected, _logits(_hf(arch, base_dir), arch, ours=False), atol=1e-3)  # it matters
