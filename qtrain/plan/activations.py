"""Activations: what a step saves for backward, per decoder layer and per token, and the loss's share.

Written from what autograd actually keeps in qtrain's Llama-style step (checked op by op with
the storage tracker in qtrain/train/memtrack.py), per layer and token, `a` bytes per element of
the compute dtype:
- each RMSNorm keeps its input upcast to fp32 (4h; in fp32 compute, the residual tensor itself);
- a LoRA linear keeps its input (shared by q/k/v and by gate/up; with dropout, each keeps its own
  dropped copy plus a bool mask) and x·Aᵀ (r values); a frozen linear without an adapter keeps
  nothing of its input (it needs only W for dx);
- SDPA keeps q and k after rotary, v, its output (o_proj's input) and an fp32 logsumexp per
  head; with a padding mask transformers repeats k and v to all query heads first;
- the gated MLP keeps gate's output (SiLU's input), SiLU's output and up's output (the product's
  inputs), and the product when down_proj has an adapter.
The first layer's norm keeps nothing (no gradient flows into the embeddings); the final norm
keeps its input: the two cancel, so the model holds `layers` times one layer.

Gradient checkpointing keeps each layer's input (model dtype) instead, recomputes one layer at a
time in backward, and there each adapted linear keeps its dequantized weight for its own
backward (`save_weight_for_backward`). Selective recompute (`train.recompute`) also keeps, per
layer, attention's outputs and the kept linears' matmul outputs (see qtrain/peft/recompute.py).
"""

from __future__ import annotations

from qtrain.models.arch_spec import spec_for_type
from qtrain.peft.recompute import keeps_output
from qtrain.plan.model_shape import Linear
from qtrain.plan.settings import Settings

LOGITS_PER_CHUNK = 1 << 27  # qtrain_kernels.fused_ce: logits per chunk of the fused cross-entropy


def _keeps_input(lin: Linear, s: Settings) -> bool:
    """Whether the linear saves its input for backward: an adapter, or a trained dense weight."""
    return lin.adapted or (s.method == "full" and not lin.quantized)


def _group_input(s: Settings, lins: list[Linear], width: int, from_stream: bool = True,
                 shared_elsewhere: bool = False) -> int:
    """Bytes per token a group of linears reading one input saves of it. An input in the residual
    stream's dtype that is not the compute dtype is cast by each linear on its own (autocast, or
    LoRALinear's cast), so each keeps its own copy."""
    keep = [lin for lin in lins if _keeps_input(lin, s)]
    if not keep:
        return 0
    if s.method == "lora" and s.dropout > 0:
        return len(keep) * (s.a + 1) * width  # each its own dropped input and a bool mask
    if from_stream and stream_bytes(s) != s.a:
        return len(keep) * s.a * width
    return 0 if shared_elsewhere else s.a * width


def padding_mask(s: Settings) -> bool:
    """Unpacked rows are padded, and transformers then builds a 4-D mask (packed rows need none)."""
    return not s.packing


def layer_per_token(s: Settings, layer: int = 0) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing."""
    sh = s.shape
    h, i, hq = sh.hidden, sh.intermediate, sh.heads * sh.head_dim
    kv = hq if padding_mask(s) else sh.kv_heads * sh.head_dim
    lins = sh.layer_linears(layer)
    role = {r: [lin for lin in lins if lin.role == r] for r in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    saved = 2 * 4 * h                                              # the two norms' fp32 inputs
    saved += _group_input(s, role["attn_in"], h) + _group_input(s, role["mlp_in"], h)
    saved += _group_input(s, role["attn_out"], hq, from_stream=False, shared_elsewhere=True)  # kept by SDPA
    saved += _group_input(s, role["mlp_out"], i, from_stream=False)
    saved += s.a * (2 * hq + 2 * kv) + 4 * sh.heads                # q, k, v, attention output, logsumexp
    saved += 3 * s.a * i                                           # gate out, SiLU out, up out
    saved += sum(s.a * s.r for lin in lins if lin.adapted)         # x·Aᵀ
    if s.method == "full":
        saved += 2 * stream_bytes(s) * h                           # trained norm weights keep the normalized input
    return saved


def weight_casts(s: Settings, lins) -> int:
    """Compute-dtype copies of trained weights that backward keeps: LoRA's A and B (fp32 masters), or
    under full fine-tuning every trained linear's weight (autocast's cast); nothing in fp32 compute."""
    if s.a == 4:
        return 0
    if s.method == "full":
        return sum(s.a * lin.numel for lin in lins if not lin.quantized)
    return sum(s.a * s.r * (lin.in_features + lin.out_features) for lin in lins if lin.adapted)


def kept_per_token(s: Settings, layer: int = 0) -> int:
    """Selective recompute: what a checkpointed layer keeps besides its input (none for `full`); the
    adapted linears' outputs per qtrain.peft.recompute (`attention`: the attention projections',
    `mlp`: the others', `matmuls`: all; never the FFN output projection's where the spec says no
    recompute needs it)."""
    if s.recompute == "full":
        return 0
    sh = s.shape
    kept = sh.heads * sh.head_dim * s.a + 4 * sh.heads  # attention's output and logsumexp
    spec = spec_for_type(sh.model_type)
    unneeded = spec.unneeded_outputs() if spec else ()
    for lin in sh.layer_linears(layer):
        if lin.adapted and keeps_output(s.recompute, lin.name.rsplit(".", 1)[-1], unneeded=unneeded):
            fused = s.fused_lora and lin.quantized  # the fused kernel's output is no aten matmul
            kept += 0 if fused else s.a * lin.out_features  # y: the base product's output (one tensor)
    return kept


def stream_bytes(s: Settings) -> int:
    """Bytes per element of the residual stream (the embeddings' dtype): a checkpointed layer's input."""
    return s.dense_bytes


def saved_all_layers(s: Settings, in_backward: bool = False) -> int:
    """What the forward leaves saved for backward across the model, adapter casts and mask included.

    With checkpointing, the final norm's fp32 input is kept too, until backward has passed the
    norm (`in_backward`: the first layer recompute comes after it)."""
    sh, t = s.shape, s.tokens
    mask = s.micro_batch * s.max_len ** 2 if padding_mask(s) else 0
    if not s.checkpointing:
        return sh.layers * layer_per_token(s) * t + weight_casts(s, sh.linears) + _full_extra(s) + mask
    per_layer = stream_bytes(s) * sh.hidden + kept_per_token(s)
    final_norm = 0 if in_backward else 4 * sh.hidden * t
    return sh.layers * per_layer * t + final_norm + _full_extra(s) + mask


def _full_extra(s: Settings) -> int:
    """Full fine-tuning trains the embeddings, the final norm and lm_head: the first layer's norm
    input, the final norm's normalized input (stream dtype) and lm_head's input (compute dtype)
    are kept too."""
    if s.method != "full":
        return 0
    first_norm = 0 if s.checkpointing else 4 * s.shape.hidden  # a checkpointed layer keeps its input anyway
    return (first_norm + (stream_bytes(s) + s.a) * s.shape.hidden) * s.tokens


def dense_weight_bytes(s: Settings, lin: Linear) -> int:
    """A dense compute-dtype copy of one frozen weight: NF4 dequantized (none on the fused Triton
    path), or a dense base cast to another dtype (none when it already is the compute dtype)."""
    if lin.quantized:
        return 0 if s.fused_lora else s.a * lin.numel
    return 0 if s.dense_bytes == s.a or s.method == "full" else s.a * lin.numel


def recomputed_layer(s: Settings) -> int:
    """Checkpointing: the layer being recomputed in backward, with its kept dense weights. Its peak
    comes in the MLP's backward, once down_proj's backward has released that weight."""
    if not s.checkpointing:
        return 0
    lins = s.shape.layer_linears(0)
    weights = sum(dense_weight_bytes(s, lin) for lin in lins if lin.adapted and lin.role != "mlp_out")
    return (layer_per_token(s) - kept_per_token(s)) * s.tokens + weights + weight_casts(s, lins)


def backward_temporaries(s: Settings) -> int:
    """Gradients of activations in flight in one layer's backward (the MLP's: two of tokens x
    intermediate) and the frozen weight dequantized for dx when it was not kept."""
    lins = s.shape.layer_linears(0)
    kept = s.checkpointing
    transient = max((dense_weight_bytes(s, lin) for lin in lins if not (kept and lin.adapted)), default=0)
    return 2 * s.a * s.shape.intermediate * s.tokens + transient


def loss_peak(s: Settings) -> int:
    """The loss's own peak. Logits path: the logits (compute dtype), their fp32 copy and
    log-softmax in forward, then log-softmax, its gradient and the NLL gradient (three fp32
    tensors) in backward. Fused: one chunk of logits plus the hidden states' copies and gradient."""
    sh, t = s.shape, s.tokens
    if not s.fused_ce:
        return max(s.a + 8, 12) * sh.vocab * t
    rows = min(t, max(1, LOGITS_PER_CHUNK // sh.vocab))
    return rows * sh.vocab * s.a + 4 * s.a * sh.hidden * t
