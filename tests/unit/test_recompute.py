"""Every recompute policy computes the same gradients as no checkpointing at all."""

import pytest
import torch

from qtrain.config import recipe_from_dict
from qtrain.peft.inject import lora_modules
from qtrain.train.loss import causal_lm_loss_sum
from qtrain.train.setup import build_model
from lora_helpers import randomize_lora_b

IDS = torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(0))


def _grads(base_dir, tmp_path, checkpointing: bool, recompute: str, quant: str):
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path), "model": {"path": str(base_dir), "dtype": "float32"},
        "quant": {"method": quant}, "data": {"path": "unused.jsonl"},
        "train": {"gradient_checkpointing": checkpointing, "recompute": recompute},
    })
    torch.manual_seed(0)
    model, _ = build_model(recipe, base_dir, torch.device("cpu"))
    model.train()
    randomize_lora_b(model, seed=1, std=0.02)
    loss = causal_lm_loss_sum(model(input_ids=IDS).logits, IDS)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", ["nf4", "none"])
@pytest.mark.parametrize("recompute", ["full", "attention", "matmuls"])
def test_recompute_policy_gives_the_gradients_of_no_checkpointing(tiny_base_dir, tmp_path, quant, recompute):
    ref_loss, ref = _grads(tiny_base_dir, tmp_path, False, "full", quant)
    loss, got = _grads(tiny_base_dir, tmp_path, True, recompute, quant)
    assert loss == ref_loss
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


def test_policies_mark_the_right_layers(tiny_base_dir, tmp_path):
    for recompute, expected in [("full", set()), ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                ("matmuls", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"})]:
        recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"path": str(tiny_base_dir)},
                                   "data": {"path": "x.jsonl"}, "train": {"recompute": recompute}})
        model, _ = build_model(recipe, tiny_base_dir, torch.device("cpu"))
        kept = {n.rsplit(".", 1)[-1] for n, m in lora_modules(model).items() if m.keep_output}
        assert kept == expected, recompute
