"""The trainer's fused-loss path (hidden states + lm_head through the chunked linear + CE) gives
the logits path's loss and gradients. It runs the chunked pure-torch backend of that function;
tests/kernels compares its Triton backend with the torch one."""

from pathlib import Path

import torch

from qtrain.config import load_recipe
from qtrain.data import collate
from qtrain.distributed.env import DistEnv
from qtrain.train.loop import loss_sum_of
from qtrain.train.setup import prepare

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.from_config.hidden_size=64", "model.from_config.intermediate_size=128",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
        "model.from_config.num_key_value_heads=2", "model.dtype=float32", "data.max_len=64",
        "quant.method=none"]


def test_fused_loss_path_equals_the_logits_path(tmp_path):
    s = prepare(load_recipe(REPO / "configs/quickstart.yaml", TINY + [f"output_dir={tmp_path}"]), DistEnv())
    backend = s.fused_ce_backend
    assert backend in ("bnb", "reference")  # kernels: auto takes the fused loss on CPU too, with its torch row step
    s.fused_ce_backend = None  # the logits path, as the reference
    with torch.no_grad():
        for name, p in s.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    batch = collate(s.data.train[:3], s.tokenizer.pad_token_id)
    ref = loss_sum_of(s, batch)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in s.model.named_parameters() if p.requires_grad}
    s.optimizer.zero_grad(set_to_none=True)

    s.fused_ce_backend = backend
    fused = loss_sum_of(s, batch)
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=0)
    for name, p in s.model.named_parameters():
        if p.requires_grad:
            scale = float(ref_grads[name].abs().max())
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-5 * scale, msg=name)
