"""Using what was trained: generation, merge/export, several adapters over one base."""

from qtrain.infer.adapters import AdapterSet
from qtrain.infer.decode import generate_tokens
from qtrain.infer.generate import generate_text
from qtrain.infer.load import BaseOptions, load_with_adapters
from qtrain.infer.merge import MergeOptions, merge_to_dir
from qtrain.infer.multi_lora import MultiLoRALinear, convert_lora_model, use_adapters
from qtrain.infer.sampling import SamplingConfig

__all__ = [
    "AdapterSet", "BaseOptions", "MergeOptions", "MultiLoRALinear", "SamplingConfig",
    "convert_lora_model", "generate_text", "generate_tokens", "load_with_adapters", "merge_to_dir",
    "use_adapters",
]
