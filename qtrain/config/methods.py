"""What each fine-tuning method asks of a recipe: the `peft.*` keys it reads and what it needs.

This is the recipe side of the method registry (`qtrain/peft/registry.py`): the config layer
validates a recipe without importing the methods, so the methods' recipe contract lives here,
one entry per method, and each method class in `qtrain/peft/` points at its entry (a test checks
that both name the same methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PeftMethod = Literal["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "bottleneck", "compacter", "bitfit",
                     "freeze", "diff_pruning", "full"]

_LORA_KEYS = frozenset({"r", "alpha", "dropout", "rslora", "targets"})
_ADAPTER_KEYS = frozenset({"reduction_factor", "placement", "activation"})


@dataclass(frozen=True)
class MethodRules:
    """A method's recipe contract."""

    # The peft.* keys the method reads (besides `method`); setting any other one is an error.
    keys: frozenset
    # It trains the base's own weights, so the base cannot be 4-bit (quant.method: none).
    unquantized_base: bool = False
    # It runs under DeepSpeed (ZeRO-1/2).
    deepspeed: bool = True
    # It runs over a base sharded across ranks (distributed.engine: fsdp, DeepSpeed ZeRO-3): tested for LoRA only.
    sharded_base: bool = False
    # It changes the sequence (virtual tokens or key/value prefixes): batches must be padded rows,
    # one example per row, never packed.
    padded_batches: bool = False


METHOD_RULES: dict[str, MethodRules] = {
    "lora": MethodRules(_LORA_KEYS, sharded_base=True),
    "dora": MethodRules(_LORA_KEYS),
    "ia3": MethodRules(frozenset({"targets", "feedforward_targets"})),
    "prompt_tuning": MethodRules(frozenset({"num_virtual_tokens", "prompt_init", "prompt_init_text"}),
                                 padded_batches=True),
    "prefix_tuning": MethodRules(frozenset({"num_virtual_tokens", "prefix_projection", "prefix_hidden_size"}),
                                 padded_batches=True),
    "bottleneck": MethodRules(_ADAPTER_KEYS),
    "compacter": MethodRules(_ADAPTER_KEYS | {"phm_dim", "phm_rank"}),
    "bitfit": MethodRules(frozenset({"targets"})),
    "freeze": MethodRules(frozenset({"layers_to_train", "layer_range"})),
    "diff_pruning": MethodRules(frozenset({"targets", "target_sparsity", "l0_weight"})),
    "full": MethodRules(frozenset(), unquantized_base=True, deepspeed=False),
}


def readers_of(key: str) -> list[str]:
    """The methods that read `peft.<key>`, for error messages."""
    return [name for name, rules in METHOD_RULES.items() if key in rules.keys]
