"""Attach adapters by replacing target module *instances*; transformers' classes stay untouched.

The mechanism is in layer.py (linear-layer methods) and each method's file; this module keeps
the LoRA entry points other code and tests call by name.
"""

from __future__ import annotations

from qtrain.peft.layer import LINEAR_TYPES, adapted_linears
from qtrain.peft.lora import inject_lora, lora_modules

__all__ = ["LINEAR_TYPES", "adapted_linears", "inject_lora", "lora_modules"]
