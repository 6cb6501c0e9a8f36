"""Parameter-efficient methods: LoRA now; one file per method, one injection mechanism."""

from qtrain.peft.inject import inject_lora, lora_modules
from qtrain.peft.lora import LoRALinear, lora_scale

__all__ = ["LoRALinear", "inject_lora", "lora_modules", "lora_scale"]
