"""What gradient checkpointing recomputes in backward (torch's selective activation checkpointing).

- `full`: recompute the whole decoder layer (HF's default; least memory).
- `mlp`: keep the outputs of the MLP's projections (gate, up, down: two thirds of a Llama layer's
  FLOPs) and of attention itself; recompute the attention projections and the element-wise ops.
  Costs (gate + up + attn) outputs per token on Llama (down's is not needed, see below).
- `attention`: keep the outputs of the attention block's projections and of attention itself;
  recompute the MLP and the element-wise ops. Costs (q + k + v + o + attn) outputs per token.
- `matmuls`: keep every adapted linear's output and attention's; recompute only element-wise
  ops. Fastest; its memory grows with tokens x layers x (sum of projection widths), e.g.
  ~10 GB for a Llama-8B step of 4k tokens, so it is for small models or short sequences.

A LoRA layer that is the FFN's output projection (Llama's down_proj) keeps nothing in any mode
where no dropout follows it (`ArchSpec.unneeded_outputs`): only the residual add that ends the
layer reads its output, and that saves nothing, so torch's recompute stops before its base
product once the tensors its backward needs (its low-rank term's) are back. Keeping it would cost
a [tokens, hidden] tensor per layer (~32 MiB per layer for an 8B model at 4k tokens) for no FLOP;
tests/unit/test_recompute.py counts the FLOPs both ways. Layers that save something after their
base product (DoRA, (IA)³, BitFit: `AdaptedLinear.base_product_saves_nothing`) still keep it.

A kept linear keeps one [tokens, out_features] tensor, its base product's output (the low-rank
branch is marked by `qtrain_kernels.lora_linear.low_rank_product` and recomputed).

Measured on the CPU benchmark (hidden 1024 x 8 layers, 512 tokens): see benchmarks/results.
Which linears keep their output is decided per module (`AdaptedLinear.keep_output`, set by
`qtrain.peft.layer.prepare_recompute`); the policy reads it through a context variable the module
sets around its own matmuls.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import torch

from qtrain_kernels.lora_linear import in_low_rank_product

_KEEP = contextvars.ContextVar("qtrain_keep_matmul_output", default=False)
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_ATTENTION_PREFIX = "aten._scaled_dot_product"
# Llama's names: the policy's fallback for a model family without an architecture spec.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@contextlib.contextmanager
def keep_matmul_outputs(keep: bool) -> Iterator[None]:
    token = _KEEP.set(keep)
    try:
        yield
    finally:
        _KEEP.reset(token)


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _MATMULS and _KEEP.get() and not in_low_rank_product():
        return CheckpointPolicy.MUST_SAVE
    if str(op).startswith(_ATTENTION_PREFIX):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(recompute: str) -> dict:
    """kwargs for `model.activation_checkpointing_enable(activation_checkpointing_kwargs=...)`."""
    kwargs: dict = {"use_reentrant": False}
    if recompute != "full":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _policy)
    return kwargs


def keeps_output(recompute: str, leaf: str, attention: tuple[str, ...] = ATTENTION_PROJECTIONS,
                 unneeded: tuple[str, ...] = ()) -> bool:
    """Whether an adapted linear named `leaf` keeps its output under `recompute`; `attention` are the
    leaf names of the attention's projections, `unneeded` those whose output nothing needs again
    (`ArchSpec.unneeded_outputs`: the recompute stops before them, so keeping costs memory only)."""
    if leaf in unneeded:
        return False
    if recompute == "matmuls":
        return True
    return (recompute == "attention" and leaf in attention) or (recompute == "mlp" and leaf not in attention)
