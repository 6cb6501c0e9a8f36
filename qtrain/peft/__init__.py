"""Fine-tuning methods: one file per method behind one interface (method.py), found by name in
registry.py; linear-layer methods share one injection mechanism (layer.py)."""

from qtrain.peft.inject import inject_lora, lora_modules
from qtrain.peft.lora import LoRALinear, lora_scale
from qtrain.peft.registry import METHODS, get_method, method_for

__all__ = ["LoRALinear", "METHODS", "get_method", "inject_lora", "lora_modules", "lora_scale", "method_for"]
