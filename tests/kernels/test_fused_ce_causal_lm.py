"""Wiring the fused CE into a causal LM (what qtrain/train/loss.py does with it): the decoder's
hidden states + lm_head weight through `fused_linear_cross_entropy` give the trainer's loss sum
and the same gradients as `causal_lm_loss_sum` over the model's logits.

fp32 throughout; the two differ only in the lm_head GEMMs' summation order (depth H = 64, then
V), so agreement to 1e-5 of the largest value (~100x the fp32 bound) is a strict check.
"""

import pytest
import torch

from qtrain.train.loss import IGNORE_INDEX, causal_lm_loss_sum
from qtrain_kernels.fused_ce import fused_linear_cross_entropy


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_ce_equals_trainer_loss_on_a_tiny_llama(backend):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).float()
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # a masked prompt

    ref = causal_lm_loss_sum(model(input_ids=ids).logits, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    loss = fused_linear_cross_entropy(hidden[:, :-1], model.get_output_embeddings().weight, labels[:, 1:],
                                      IGNORE_INDEX, chunk_size=5, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=0, atol=1e-5 * scale, msg=name)
