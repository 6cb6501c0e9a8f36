"""What a device holds for the whole step: weights, adapter, gradients, optimizer state, engine buffers.

One function per component, each returning bytes on one device and reading the engine's shares
as data (engines.py). Sizes follow the storage the code really allocates:
- NF4 (qtrain/quant/nf4.py, bitsandbytes' layout): half a byte per value, plus per block of
  `blocksize` values either an fp32 absmax or, double-quantized, a uint8 code with one fp32
  second-level absmax per 256 blocks and one fp32 offset per weight: 0.5 + 1/64 + 4/(64*256)
  bytes per parameter at blocksize 64 (4.13 bits).
- LoRA's A and B are fp32 (master weights; cast to the compute dtype on use), so are their grads.
- Optimizer state per trainable tensor: torch AdamW two fp32 moments (8 B/param); bitsandbytes'
  8-bit AdamW two uint8 states plus an fp32 absmax per 256 values each, but fp32 states for a
  tensor under 4096 values (`min_8bit_size`); the paged variants put the state of tensors of
  1e5 values or more in CUDA unified memory, which the device holds only while the step runs and
  which the driver evicts to host memory under pressure (on a CPU, paging is off).
"""

from __future__ import annotations

import math

from qtrain.plan.settings import Settings

MIN_8BIT_SIZE = 4096       # bitsandbytes Optimizer2State: smaller tensors keep fp32 states
BNB_STATE_BLOCK = 256      # bitsandbytes' 8-bit optimizer block (one fp32 absmax per block per state)
PAGED_MIN_NUMEL = 100_000  # bitsandbytes get_state_buffer: smaller tensors are never paged
ABSMAX2_BLOCK = 256        # NF4 double quantization: absmax codes per second-level block


def _share(n: int, sharded: bool, s: Settings) -> int:
    return math.ceil(n / s.world) if sharded else n


def nf4_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one NF4 weight of `numel` values, as qtrain.quant.nf4.NF4Weight stores it."""
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / ABSMAX2_BLOCK) + 4


def base_nf4(s: Settings) -> int:
    total = sum(nf4_bytes(lin.numel, s.blocksize, s.double_quant) for lin in s.shape.linears if lin.quantized)
    return _share(total, s.engine.shards_base, s)


def base_dense(s: Settings) -> int:
    """Embeddings, norms, lm_head, biases and unquantized linears in the model dtype (fp32 under full
    fine-tuning, where they are the trained weights), plus the model's buffers."""
    return _share(s.shape.dense_params * s.dense_bytes, s.engine.shards_base, s) + s.shape.buffer_bytes


def adapter(s: Settings) -> int:
    """LoRA's fp32 A and B (full fine-tuning: its weights are `base_dense`)."""
    if s.method == "full":
        return 0
    return _share(4 * sum(s.trainable), s.engine.shards_adapter, s)


def gradients(s: Settings) -> int:
    """fp32 gradients of the trainable tensors (a partition under ZeRO-2/3 and FSDP)."""
    return _share(4 * sum(s.trainable), s.engine.shards_grads, s)


def optimizer_state_bytes(numel: int, optimizer: str) -> int:
    """Optimizer state of one trainable tensor of `numel` values."""
    if optimizer.endswith("8bit") and numel >= MIN_8BIT_SIZE:
        return 2 * numel + 2 * 4 * math.ceil(numel / BNB_STATE_BLOCK)
    return 8 * numel


def _optimizer_tensors(s: Settings) -> tuple[int, ...]:
    """The tensors the optimizer steps on this device: the trainable ones, or ZeRO's flat partition."""
    e = s.engine
    if e.optimizer_sees_flat:
        return (math.ceil(sum(s.trainable) / s.world),)
    return tuple(_share(n, e.shards_optimizer, s) for n in s.trainable)


def _paged(numel: int, s: Settings) -> bool:
    return s.optimizer.startswith("paged") and s.device == "cuda" and numel >= PAGED_MIN_NUMEL


def optimizer_state(s: Settings) -> int:
    """Optimizer state held in device memory (paged state excluded: see `optimizer_paged`)."""
    return sum(optimizer_state_bytes(n, s.optimizer) for n in _optimizer_tensors(s) if not _paged(n, s))


def optimizer_paged(s: Settings) -> int:
    """Optimizer state in CUDA unified memory: on the device during the step, evicted under pressure."""
    return sum(optimizer_state_bytes(n, s.optimizer) for n in _optimizer_tensors(s) if _paged(n, s))


def master_copy(s: Settings) -> int:
    """ZeRO's fp32 copy of this rank's partition of the trainable parameters."""
    return 4 * math.ceil(sum(s.trainable) / s.world) if s.engine.master_copy else 0


def grad_buckets(s: Settings) -> int:
    """DDP's flat fp32 reducer buckets: one more copy of the trainable parameters."""
    return 4 * sum(s.trainable) if s.engine.grad_buckets else 0


def reduce_bucket(s: Settings) -> int:
    """DeepSpeed's contiguous reduce bucket, allocated at each backward (fp32)."""
    return 4 * s.engine.reduce_bucket_elems


def layer_parameter_bytes(s: Settings, layer: int = 0) -> int:
    """One decoder block's parameters as stored (NF4 or dense, plus its adapter)."""
    lins = s.shape.layer_linears(layer)
    nf4 = sum(nf4_bytes(lin.numel, s.blocksize, s.double_quant) for lin in lins if lin.quantized)
    dense = sum(lin.numel for lin in lins if not lin.quantized) * s.dense_bytes
    lora = sum(4 * s.r * (lin.in_features + lin.out_features) for lin in lins if lin.adapted)
    return nf4 + dense + lora


def gathered_blocks(s: Settings) -> int:
    """Sharded engines: the whole parameters of the blocks gathered at once (in use + prefetched)."""
    return s.engine.gathered_blocks * layer_parameter_bytes(s)
