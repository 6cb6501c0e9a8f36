"""qtrain's kernels: pure-torch references and (on CUDA) fused Triton kernels.

Imported as `qtrain_kernels`, never `kernels` (a PyPI package of that name exists and
bitsandbytes imports it).
"""
