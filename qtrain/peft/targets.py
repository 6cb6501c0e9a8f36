"""Which linear layers get an adapter: PEFT's matching rules, so target lists mean the same there.

`auto` (the default) is the architecture spec's choice for the method (qtrain/models/arch_spec.py)
and `all-linear` every linear but the output head, as in peft; both resolve to a list of names
before anything is saved, so a saved adapter_config.json always lists its modules.

Names are the model's own: Llama-style decoders have q_proj ... down_proj; T5-family
encoder-decoders have q, k, v, o (self- and cross-attention alike) and wi (or wi_0/wi_1 when
gated), wo. A list entry matches in the encoder and the decoder alike.
"""

from __future__ import annotations

import re
from typing import Callable, Union

from torch import nn

from qtrain.errors import ConfigError
from qtrain.models.arch_spec import present_leaves


def matches(name: str, targets: Union[list[str], str]) -> bool:
    """A list matches a module whose name is, or ends with '.' + , an entry; a string is a full-match regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: Union[list[str], str], linear_types: tuple[type, ...]) -> list[str]:
    """Names of the linear modules matching `targets`; ConfigError if none match."""
    names = [n for n, m in model.named_modules() if isinstance(m, linear_types) and matches(n, targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear_types)})
        suggested = layer_names(model, linear_types)
        hint = f"; e.g. peft.targets: [{', '.join(suggested)}]" if suggested else ""
        raise ConfigError(
            f"peft.targets: {targets!r} matches no linear layer of this model; "
            f"its linear layers are named {', '.join(linear) or '(none)'}{hint}"
        )
    return names


def layer_names(model: nn.Module, linear_types: tuple[type, ...]) -> list[str]:
    """The distinct last names of the model's linear layers, output head excluded: the list that
    targets every adaptable linear (T5 v1.1: k, o, q, v, wi_0, wi_1, wo)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, linear_types) and m is not head})


def resolve_targets(model: nn.Module, targets: Union[list[str], str], default: Callable[[], list[str]],
                    linear_types: tuple[type, ...]) -> Union[list[str], str]:
    """`auto` -> the method's default for this architecture (only names the model has); `all-linear`
    -> every linear's name but the output head's (peft's keyword); anything else as given."""
    if targets == "auto":
        leaves = present_leaves(model, default(), linear_types)
        if not leaves:
            raise ConfigError(f"peft.targets: auto found none of {default()} in this model; "
                              f"name the layers, e.g. peft.targets: [{', '.join(layer_names(model, linear_types))}]")
        return leaves
    if targets == "all-linear":
        return layer_names(model, linear_types)
    return targets
