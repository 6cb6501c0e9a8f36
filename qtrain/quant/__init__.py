"""NF4 storage (bitsandbytes layout) and the 4-bit linear layer."""

from qtrain.quant.linear import NF4Linear, dense_weight_fn
from qtrain.quant.nf4 import NF4Spec, NF4Weight

__all__ = ["NF4Linear", "NF4Spec", "NF4Weight", "dense_weight_fn"]
