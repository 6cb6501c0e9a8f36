"""Checkpoint keys as transformers' `from_pretrained` reads them.

transformers 5 keeps, per architecture, the renames between what checkpoints store and what the
model names (GPT-NeoX's `embed_out` is the model's `lm_head`; legacy LayerNorm `gamma`/`beta`; a
checkpoint of the bare base model loaded under a task head gains the `model.` prefix) and the
converters that merge several stored tensors into one (MoE families store experts one by one and
the model stacks them). The streaming loader applies the renames with transformers' own mapping
(`conversion_mapping.get_model_conversion_mapping` and `core_model_loading.rename_source_key`), so
it reads every dir `from_pretrained` reads. Converters would need whole groups of tensors merged
before quantizing; the loader refuses those dirs with a message that says what loads.
"""

from __future__ import annotations

import itertools
from typing import Callable

from torch import nn

from qtrain.errors import ModelError


def checkpoint_key_map(model: nn.Module, model_dir: object) -> Callable[[str], str]:
    """A function from a stored key to the model's parameter name.

    Raises (when called):
        ModelError: the key belongs to tensors transformers merges on load (per-expert MoE weights).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    # rename_source_key reads this to add or strip the base-model prefix (any non-None value).
    names = {n: True for n, _ in itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers())}
    prefix = getattr(model, "base_model_prefix", None) or None

    def target(key: str) -> str:
        renamed, merged_by = rename_source_key(key, renamings, converters, prefix, names)
        if merged_by is not None:
            raise ModelError(
                f"model.path: {model_dir} stores {key}, which transformers merges with other tensors on load "
                f"({model.config.model_type}: '{merged_by}' into {renamed}); qtrain's streaming 4-bit loader "
                "does not merge stored tensors yet. Models whose stored tensors map one to one load (dense "
                "models such as Llama, Qwen2, GPT-NeoX and T5); for this MoE family use transformers + peft")
        return renamed

    return target
