"""Which linear layers get an adapter: PEFT's matching rules, so target lists mean the same there."""

from __future__ import annotations

import re
from typing import Union

from torch import nn

from qtrain.errors import ConfigError


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
        raise ConfigError(
            f"peft.targets: {targets!r} matches no linear layer of this model; "
            f"its linear layers are named {', '.join(linear) or '(none)'}"
        )
    return names
