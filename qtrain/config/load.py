"""Read a recipe: safe YAML, `key.sub=value` overrides, typed build, cross-field checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qtrain.config.schema import Recipe
from qtrain.config.typed import build
from qtrain.config.validate import check_values
from qtrain.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file with `yaml.safe_load`; python tags and bad syntax become ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path} (pass the path of a YAML recipe, e.g. configs/quickstart.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from None
    return parse_yaml_text(text, str(path))


def safe_load(text: str) -> Any:
    """`yaml.safe_load`, with its constructors' own crashes raised as `yaml.YAMLError`.

    A scalar that looks typed but is not (`2024-13-45`, `!!int abc`) makes PyYAML raise
    ValueError and others; safe loading runs no user code, so any failure means bad input.
    """
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise yaml.YAMLError(f"cannot build a value: {exc} (quote a value meant as a string)") from None


def parse_yaml_text(text: str, source: str) -> dict[str, Any]:
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"malformed YAML{where}: {problem}; fix the syntax", source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the recipe must be a mapping of sections, got {type(data).__name__}", source)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in order; values are parsed as YAML (`null`, `3`, `[a, b]`)."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: expected key.sub=value (e.g. train.max_steps=20)")
            continue
        try:
            value = safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            problems.append(f"override {item!r}: value is not valid YAML; quote it")
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return data


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    problems: list[str] = []
    recipe = build(Recipe, data, problems)
    # Range checks run on the fields that did parse, so one run reports everything.
    problems.extend(check_values(recipe))
    if problems:
        raise ConfigError(problems, source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The one entry point: file + overrides → validated `Recipe`, or one ConfigError listing all problems."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    return recipe_from_dict(data, str(path))
