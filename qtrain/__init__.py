"""qtrain: fine-tune LLMs with LoRA on a 4-bit NF4 base, from one GPU to a cluster."""

__version__ = "0.1.0"
