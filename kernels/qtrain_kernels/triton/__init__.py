"""Fused Triton kernels for the QLoRA hot path, one module per kernel:

- `nf4_dequant`: packed NF4 (+ double-quantized absmax) → bf16/fp16/fp32, bit-exact with bitsandbytes;
- `lora_matmul`: Y = X·deq(W)ᵀ + s·(X·Aᵀ)·Bᵀ + b and dX = G·deq(W) + s·((G·B)·A) ⊙ mask, W dequantized
  tile by tile inside the GEMM loop, the low-rank term added in the epilogue;
- `gemv_nf4`: the same forward for M ≤ 16 rows (generation), split-K over the 4-bit weight;
- `fused_ce`: row-wise cross-entropy that overwrites a logits chunk with its gradient.

Each module imports triton at its top, so this package's `__init__` imports none of them:
`import qtrain_kernels` (and `qtrain_kernels.triton`) works without triton or CUDA. Callers go
through `qtrain_kernels.dispatch`, which imports a kernel module on first use. `@triton.jit` runs
at that import, so TRITON_INTERPRET must be set before it for the CPU interpreter to be used.
"""
