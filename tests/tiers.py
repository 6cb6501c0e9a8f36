"""The extended tier: more variants of behaviour the default run already checks once.

`python -m pytest -q` (CI, the README's command) runs one representative of each behaviour, so the
whole suite stays well inside CI's time on 2 CPU cores; `python -m pytest -q -m extended` runs the
other variants (more kill points, fault points, corruptions, engines and methods). Run it before a
release and after changing the module a variant exercises.
"""

from __future__ import annotations

from typing import Any, Iterable

import pytest

EXTENDED = pytest.mark.extended


def extended_but(values: Iterable[Any], default: Any) -> list:
    """`values` as parametrize values, every one but `default` in the extended tier."""
    return [v if v == default else pytest.param(v, marks=EXTENDED) for v in values]
