"""The method registry: `peft.method` name -> its `Method` object, and a saved adapter -> its method.

One file per method under qtrain/peft/; adding one is a new file plus a line here and its entry
in config/methods.py (what it reads from the recipe).
"""

from __future__ import annotations

from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError, ConfigError
from qtrain.peft.bitfit import BitFit
from qtrain.peft.bottleneck import BottleneckAdapters
from qtrain.peft.compacter import Compacter
from qtrain.peft.diff_pruning import DiffPruning
from qtrain.peft.dora import DoRA
from qtrain.peft.freeze import Freeze
from qtrain.peft.full import Full
from qtrain.peft.ia3 import IA3
from qtrain.peft.lora import LoRA
from qtrain.peft.method import Method
from qtrain.peft.prefix_tuning import PrefixTuning
from qtrain.peft.prompt_tuning import PromptTuning

METHODS: dict[str, Method] = {m.name: m for m in (LoRA(), DoRA(), IA3(), PromptTuning(), PrefixTuning(),
                                            BottleneckAdapters(), Compacter(), BitFit(), Freeze(),
                                            DiffPruning(), Full())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"peft.method: {name!r} is not a method; choose one of {', '.join(METHODS)}") from None


def method_for(cfg: PeftConfig) -> Method:
    return get_method(cfg.method)


def method_of_artifact(config: dict, source: str) -> Method:
    """The method that wrote an adapter_config.json: qtrain's `qtrain_method`, else peft's `peft_type`."""
    name = config.get("qtrain_method")
    if name is None:
        peft_type = config.get("peft_type")
        matches = [m for m in METHODS.values() if m.peft_type is not None and m.peft_type == peft_type]
        if peft_type == "LORA":  # DoRA is peft's LoRA with use_dora
            matches = [m for m in matches if m.name == ("dora" if config.get("use_dora") else "lora")]
        if not matches:
            known = sorted({m.peft_type for m in METHODS.values() if m.peft_type})
            raise CheckpointError(f"{source}: peft_type {peft_type!r} is not one qtrain loads (it loads "
                                  f"{', '.join(known)} and its own formats)")
        return matches[0]
    if name not in METHODS:
        raise CheckpointError(f"{source}: qtrain_method {name!r} is not a method of this qtrain")
    return METHODS[name]
