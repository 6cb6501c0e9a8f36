"""Prompt and prefix tuning: what is particular to methods that change the sequence (the shared
properties are in test_method_properties.py, the peft oracle in test_peft_oracle.py)."""

import pytest
import torch

from qtrain.config import recipe_from_dict
from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.infer.decode import generate_tokens
from qtrain.infer.sampling import SamplingConfig
from qtrain.models.load import load_model
from qtrain.peft.registry import get_method
from qtrain.peft.sequence import model_logits, sequence_adapter
from qtrain.train.setup import build_model
from method_cases import peft_config, perturb

CPU = torch.device("cpu")
PROMPTS = [[5, 17, 301, 44, 9], [88, 12]]


@pytest.fixture(autouse=True)
def _own_rng():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _tuned(base_dir, method: str, **extra):
    model = load_model(base_dir, torch.float32, CPU, None)
    get_method(method).inject(model, peft_config(method, **extra))
    perturb(model, std=0.2)
    return model.eval()


def _greedy_alone(model, prompt: list[int], steps: int, decoder: bool) -> list[int]:
    """Greedy decoding without a cache: the whole sequence through the hook at every step."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([prompt + ([] if decoder else out)])
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if decoder:
                kwargs["decoder_input_ids"] = torch.tensor([[model.config.decoder_start_token_id] + out])
            out.append(int(model_logits(model, kwargs)[0, -1].argmax()))
    return out


@pytest.mark.parametrize("method,arch", [("prompt_tuning", "llama"), ("prefix_tuning", "llama"),
                                         ("prompt_tuning", "t5")])
def test_cached_batched_generation_equals_each_row_decoded_alone(method, arch, tiny_base_dir, tiny_t5_base_dir):
    model = _tuned(tiny_base_dir if arch == "llama" else tiny_t5_base_dir, method)
    got = generate_tokens(model, PROMPTS, SamplingConfig(max_new_tokens=6), eos=set(), pad_id=0)
    expected = [_greedy_alone(model, p, 6, decoder=arch == "t5") for p in PROMPTS]
    assert got == expected


def test_prefix_tuning_gradients_are_the_same_with_gradient_checkpointing(tiny_base_dir, tmp_path):
    def grads(checkpointing: bool):
        recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"path": str(tiny_base_dir), "dtype": "float32"},
                                   "quant": {"method": "nf4"}, "data": {"path": "x.jsonl", "packing": False},
                                   "peft": {"method": "prefix_tuning", "num_virtual_tokens": 3},
                                   "train": {"gradient_checkpointing": checkpointing}})
        torch.manual_seed(0)
        model, _ = build_model(recipe, tiny_base_dir, CPU)
        model.train()
        ids = torch.tensor([PROMPTS[0] * 3])
        model_logits(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).pow(2).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 5  # embedding + the MLP's two layers
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)


def test_prompt_inits(tiny_base_dir, tokenizer):
    table = load_model(tiny_base_dir, torch.float32, CPU, None).get_input_embeddings().weight
    model = load_model(tiny_base_dir, torch.float32, CPU, None)
    cfg = PeftConfig(method="prompt_tuning", prompt_init="text", prompt_init_text="Add 5", num_virtual_tokens=5)
    get_method("prompt_tuning").inject(model, cfg, tokenizer)
    ids = tokenizer("Add 5", add_special_tokens=False)["input_ids"]
    expected = table[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(sequence_adapter(model).prompt_embeddings, expected, rtol=0, atol=0)
    model = load_model(tiny_base_dir, torch.float32, CPU, None)
    get_method("prompt_tuning").inject(model, PeftConfig(method="prompt_tuning", num_virtual_tokens=4))
    for row in sequence_adapter(model).prompt_embeddings:  # vocab init: rows of the embedding table
        assert bool((table == row).all(dim=1).any())
    with pytest.raises(ConfigError, match="prompt_init: text needs the tokenizer"):
        get_method("prompt_tuning").inject(load_model(tiny_base_dir, torch.float32, CPU, None), cfg)


def test_prefix_tuning_refuses_t5_with_the_reason(tiny_t5_base_dir):
    model = load_model(tiny_t5_base_dir, torch.float32, CPU, None)
    with pytest.raises(ConfigError, match="prefix_tuning: implemented for decoder-only models.*prompt_tuning for T5"):
        get_method("prefix_tuning").inject(model, PeftConfig(method="prefix_tuning"))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_sequence_methods_pad_and_refuse_packed_or_flat_batches(method, tiny_base_dir, monkeypatch):
    from qtrain.data import Example, collate
    from qtrain.train import packing_check
    from qtrain.train.loss import batch_logits

    model = _tuned(tiny_base_dir, method)
    monkeypatch.setattr(packing_check, "attention_is_per_row", lambda implementation: True)  # as flash-attention
    assert packing_check.flat_batches("auto", load_model(tiny_base_dir, torch.float32, CPU, None))
    assert not packing_check.flat_batches("auto", model)  # the adapter's virtual tokens need padded rows
    with pytest.raises(ConfigError, match="data.padding_free: true, but prompt/prefix tuning"):
        packing_check.flat_batches(True, model)
    examples = [Example(p, p) for p in PROMPTS]
    padded = collate(examples, pad_id=0)
    assert batch_logits(model, padded).shape[:2] == padded["input_ids"].shape  # one row per real token
    with pytest.raises(ConfigError, match="set data.packing: false and data.padding_free: false"):
        batch_logits(model, collate(examples, pad_id=0, flat=True))
