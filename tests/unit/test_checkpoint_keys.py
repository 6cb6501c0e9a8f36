"""The loader reads what from_pretrained reads: transformers' own checkpoint key conversions."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, LlamaModel, MixtralConfig, MixtralForCausalLM
from transformers import GPTNeoXForCausalLM

from qtrain.config.schema import PeftConfig
from qtrain.errors import ModelError
from qtrain.models.load import load_model
from qtrain.peft.inject import inject_lora
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec

CPU = torch.device("cpu")
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _stored_keys(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as fh:
        return set(fh.keys())


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    """A GPT-NeoX (Pythia) dir saved by transformers itself: its head is stored as `embed_out`."""
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("neox") / "base"
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return out


def test_a_gpt_neox_dir_loads_as_from_pretrained_reads_it(neox_dir):
    assert "embed_out.weight" in _stored_keys(neox_dir) and "lm_head.weight" not in _stored_keys(neox_dir)
    ours = load_model(neox_dir, torch.float32, CPU, None)
    theirs = AutoModelForCausalLM.from_pretrained(neox_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)


def test_a_gpt_neox_dir_loads_in_4bit_and_trains_lora_on_its_fused_qkv(neox_dir):
    model = load_model(neox_dir, torch.float32, CPU, NF4Spec(64, True))
    assert isinstance(model.gpt_neox.layers[0].attention.query_key_value, NF4Linear)
    assert torch.equal(model.get_output_embeddings().weight,
                       AutoModelForCausalLM.from_pretrained(neox_dir).get_output_embeddings().weight)
    names = inject_lora(model, PeftConfig(r=4, targets=["query_key_value", "dense_h_to_4h"]))
    assert len(names) == 2 * model.config.num_hidden_layers
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_base_model_checkpoint_gains_the_task_heads_prefix(tmp_path):
    """A dir holding LlamaModel's tensors (no `model.` prefix) loads under LlamaForCausalLM, as in transformers."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    LlamaModel(cfg).save_pretrained(tmp_path)
    assert "embed_tokens.weight" in _stored_keys(tmp_path)
    ours = load_model(tmp_path, torch.float32, CPU, None)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits)


def test_per_expert_moe_tensors_are_a_typed_refusal_saying_what_loads(tmp_path):
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path)
    assert any(".experts.0." in k for k in _stored_keys(tmp_path))  # transformers stores experts one by one
    with pytest.raises(ModelError, match=r"model\.path: .*experts.*merges .*Llama"):
        load_model(tmp_path, torch.float32, CPU, NF4Spec(64, True))
