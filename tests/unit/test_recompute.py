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
@pytest.mark.parametrize("recompute", ["full", "mlp", "attention", "matmuls"])
def test_recompute_policy_gives_the_gradients_of_no_checkpointing(tiny_base_dir, tmp_path, quant, recompute):
    ref_loss, ref = _grads(tiny_base_dir, tmp_path, False, "full", quant)
    loss, got = _grads(tiny_base_dir, tmp_path, True, recompute, quant)
    assert loss == ref_loss
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_frozen_embedding_output_never_requires_grad(tiny_base_dir, tmp_path, checkpointing):
    """Non-reentrant checkpointing needs no gradient at the frozen embedding's output; one there makes
    backward run the first layer's input-gradient GEMMs (and ZeRO-3 gather the embedding) for nothing."""
    recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"path": str(tiny_base_dir)},
                               "data": {"path": "x.jsonl"}, "train": {"gradient_checkpointing": checkpointing}})
    model, _ = build_model(recipe, tiny_base_dir, torch.device("cpu"))
    model.train()
    assert not model.get_input_embeddings()(IDS).requires_grad
    assert model(input_ids=IDS).logits.requires_grad  # the adapter's gradients still flow


def test_policies_mark_the_right_layers(tiny_base_dir, tmp_path):
    for recompute, expected in [("full", set()), ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                ("mlp", {"gate_proj", "up_proj"}),  # down_proj's output: see below
                                ("matmuls", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"})]:
        recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"path": str(tiny_base_dir)},
                                   "data": {"path": "x.jsonl"}, "train": {"recompute": recompute}})
        model, _ = build_model(recipe, tiny_base_dir, torch.device("cpu"))
        kept = {n.rsplit(".", 1)[-1] for n, m in lora_modules(model).items() if m.keep_output}
        assert kept == expected, recompute


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_a_kept_layer_caches_one_output_its_base_product(tiny_base_dir, tmp_path, quant):
    """Under `matmuls`, an adapted linear's forward has the policy keep exactly one op's output: the
    base product that yields y (an [M, N] tensor); the low-rank branch is recomputed, not cached
    a second time at [M, N]."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from qtrain.peft import recompute as rc

    recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"path": str(tiny_base_dir), "dtype": "float32"},
                               "quant": {"method": quant}, "data": {"path": "x.jsonl"},
                               "train": {"recompute": "matmuls"}})
    model, _ = build_model(recipe, tiny_base_dir, torch.device("cpu"))
    randomize_lora_b(model, seed=1, std=0.02)
    name, layer = next((n, m) for n, m in lora_modules(model).items() if n.endswith("up_proj"))
    layer.keep_output = True
    kept = []

    def recording(ctx, op, *args, **kwargs):
        decision = rc._policy(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE:
            kept.append((str(op), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return decision

    x = torch.randn(2, 8, layer.in_features, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=False,
                     context_fn=functools.partial(create_selective_checkpoint_contexts, recording))
    out.sum().backward()
    assert len(kept) == 1, (name, kept)
    op, shapes = kept[0]
    assert op.startswith("aten.addmm"), kept
    assert shapes[1] == (16, layer.in_features) and shapes[2] == (layer.in_features, layer.out_features), kept



def _flops(fn) -> tuple[int, dict]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()


def _step_flops(base_dir, tmp_path, checkpointing: bool, recompute: str = "full", keep_down=None,
                method: str = "lora"):
    """(model, FLOPs per module of its forward, FLOPs of its backward) for one step on the tiny Llama;
    `keep_down` (True/False) overrides whether down_proj keeps its output under a selective `recompute`."""
    recipe = recipe_from_dict({"output_dir": str(tmp_path), "model": {"path": str(base_dir), "dtype": "float32"},
                               "quant": {"method": "none"}, "data": {"path": "x.jsonl"}, "peft": {"method": method},
                               "train": {"gradient_checkpointing": checkpointing, "recompute": recompute}})
    model, _ = build_model(recipe, base_dir, torch.device("cpu"))
    model.train()
    for name, layer in lora_modules(model).items():
        if keep_down is not None and name.endswith("down_proj"):
            layer.keep_output = keep_down
    out = {}
    _, forward = _flops(lambda: out.setdefault("loss", causal_lm_loss_sum(model(input_ids=IDS).logits, IDS)))
    backward, _ = _flops(out["loss"].backward)
    return model, forward, backward


def test_the_recompute_stops_before_a_base_product_no_backward_needs(tiny_base_dir, tmp_path):
    """A Llama layer's down_proj feeds only the residual add, so no backward needs its output: with
    every layer recomputed, backward costs the plain backward plus each layer's forward FLOPs except
    down_proj's base product (x·Wᵀ, 2·tokens·in·out). The low-rank term before it is recomputed."""
    model, forward, plain = _step_flops(tiny_base_dir, tmp_path, False)
    _, _, checkpointed = _step_flops(tiny_base_dir, tmp_path, True)
    layers = [k for k in forward if k.split(".")[-2:-1] == ["layers"]]
    assert len(layers) == model.config.num_hidden_layers, sorted(forward)
    down = [m for n, m in lora_modules(model).items() if n.endswith("down_proj")]
    down_base = sum(2 * IDS.numel() * m.in_features * m.out_features for m in down)
    recomputed = sum(sum(forward[k].values()) for k in layers) - down_base
    assert down_base > 0 and checkpointed - plain == recomputed


@pytest.mark.parametrize("recompute", ["mlp", "matmuls"])
def test_keeping_down_projs_output_would_save_no_flop(tiny_base_dir, tmp_path, recompute):
    """Why the policy does not keep a LoRA down_proj's output (a [tokens, hidden] tensor per layer): the
    recompute stops before its base product either way, so backward costs the same FLOPs."""
    model, _, policy = _step_flops(tiny_base_dir, tmp_path, True, recompute)
    assert not any(m.keep_output for n, m in lora_modules(model).items() if n.endswith("down_proj"))
    _, _, kept = _step_flops(tiny_base_dir, tmp_path, True, recompute, keep_down=True)
    _, _, full = _step_flops(tiny_base_dir, tmp_path, True, "full")
    assert policy == kept < full


def test_a_dora_down_proj_keeps_its_output_because_its_recompute_needs_it(tiny_base_dir, tmp_path):
    """DoRA's layer is one Function that saves tensors after its base product, so the recompute does
    reach down_proj's GEMM: the policy keeps its output, and dropping it costs that GEMM again."""
    model, _, policy = _step_flops(tiny_base_dir, tmp_path, True, "mlp", method="dora")
    down = {n: m for n, m in lora_modules(model).items() if n.endswith("down_proj")}
    assert down and all(m.keep_output for m in down.values())
    _, _, dropped = _step_flops(tiny_base_dir, tmp_path, True, "mlp", keep_down=False, method="dora")
    gemm = sum(2 * IDS.numel() * m.in_features * m.out_features for m in down.values())
    assert dropped - policy == gemm
