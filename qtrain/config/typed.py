"""Build a dataclass tree from plain dicts, collecting every type problem with its key path."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Return `value` as type `tp`, or append a problem and return _MISSING."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return _MISSING
        return build(tp, value, problems, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            trial: list[str] = []
            out = _convert(value, arg, key, trial)
            if not trial:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _MISSING
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        problems.append(f"{key}: must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return _MISSING
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return _MISSING
        (item_tp,) = typing.get_args(tp)
        items = [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return items if _MISSING not in items else _MISSING
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return _MISSING
        key_tp, val_tp = typing.get_args(tp)
        if val_tp is Any:
            return dict(value)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                problems.append(f"{key}.{k}: keys must be strings, got {type(k).__name__} {k!r}; quote the key")
            out[k] = _convert(v, val_tp, f"{key}.{k}", problems)
        return out
    return _scalar(value, tp, key, problems)


def _scalar(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        # YAML reads `2e-4` as a string (YAML 1.1); accept numeric strings for floats only.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
            if number is not None:  # nan/inf would pass every range check (`nan < 0` is False)
                problems.append(f"{key}: must be a finite number, got {value!r}")
                return _MISSING
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    problems.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return _MISSING


def build(cls: type, data: dict[str, Any], problems: list[str], prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`; unknown keys and bad types go to `problems`."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            known = ", ".join(sorted(names))
            problems.append(f"{prefix}{k}: unknown key (known keys here: {known})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        out = _convert(data[f.name], hints[f.name], f"{prefix}{f.name}", problems)
        if out is not _MISSING:
            kwargs[f.name] = out
    instance = cls(**kwargs)
    if hasattr(cls, "explicit_keys"):  # sections that need to know what the recipe set (see PeftConfig)
        instance.explicit_keys = frozenset(k for k in data if k in names)
    return instance
