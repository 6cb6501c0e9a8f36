"""Checks of the recipe's `peft:` section: the chosen method's keys, values and requirements.

Which keys a method reads and what it needs come from `methods.METHOD_RULES`; range checks run on
every key (the defaults are valid, so only values a recipe set can fail).
"""

from __future__ import annotations

import re
from typing import Union

from qtrain.config.methods import METHOD_RULES, readers_of
from qtrain.config.schema import Recipe

TARGET_KEYWORDS = ("auto", "all-linear")


def positive(problems: list[str], key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        problems.append(f"{key}: must be {bound}, got {value!r}")


def _check_targets(p: list[str], key: str, targets: Union[list[str], str]) -> None:
    if isinstance(targets, list) and not targets:
        p.append(f"{key}: empty list; name modules, e.g. [q_proj, v_proj] (or auto, all-linear)")
    if isinstance(targets, str) and targets not in TARGET_KEYWORDS:
        try:
            re.compile(targets)
        except (re.error, OverflowError, RecursionError) as exc:  # e.g. `a{4294967296}`, deep nesting
            p.append(f"{key}: invalid regex {targets!r}: {exc}")


def _check_ranges(p: list[str], r: Recipe) -> None:
    c = r.peft
    positive(p, "peft.r", c.r)
    positive(p, "peft.alpha", c.alpha)
    if not 0.0 <= c.dropout < 1.0:
        p.append(f"peft.dropout: must be in [0, 1), got {c.dropout}")
    _check_targets(p, "peft.targets", c.targets)
    _check_targets(p, "peft.feedforward_targets", c.feedforward_targets)
    for key in ("num_virtual_tokens", "reduction_factor", "phm_dim", "phm_rank", "layers_to_train"):
        positive(p, f"peft.{key}", getattr(c, key))
    if c.prefix_hidden_size is not None:
        positive(p, "peft.prefix_hidden_size", c.prefix_hidden_size)
    if not 0.0 <= c.target_sparsity < 1.0:
        p.append(f"peft.target_sparsity: must be in [0, 1) (the fraction of the delta that is zero), "
                 f"got {c.target_sparsity}")
    positive(p, "peft.l0_weight", c.l0_weight, allow_zero=True)
    if c.layer_range is not None and (len(c.layer_range) != 2 or not 0 <= c.layer_range[0] < c.layer_range[1]):
        p.append(f"peft.layer_range: must be [start, end) with 0 <= start < end, e.g. [2, 4]; got {c.layer_range}")


def _check_combinations(p: list[str], r: Recipe) -> None:
    c = r.peft
    if "prompt_init" in METHOD_RULES[c.method].keys:
        if c.prompt_init == "text" and not c.prompt_init_text:
            p.append("peft.prompt_init: 'text' needs peft.prompt_init_text (the text whose tokens start the prompt)")
        if c.prompt_init != "text" and c.prompt_init_text is not None:
            p.append(f"peft.prompt_init_text: set, but peft.prompt_init is {c.prompt_init!r}; "
                     "set peft.prompt_init: text or remove the text")
    if {"layers_to_train", "layer_range"} <= c.explicit_keys:
        p.append("peft.layer_range: set together with peft.layers_to_train; give one of them")


def check_peft(r: Recipe) -> list[str]:
    """Problems with the peft section: inapplicable keys, ranges, and the method's requirements."""
    p: list[str] = []
    method = r.peft.method
    rules = METHOD_RULES[method]
    for key in sorted(r.peft.explicit_keys - {"method"} - rules.keys - compared_keys(r)):
        readers = ", ".join(readers_of(key)) or "no method"
        p.append(f"peft.{key} does not apply to {method}; remove it (read by: {readers})")
    _check_ranges(p, r)
    _check_combinations(p, r)
    if rules.unquantized_base and r.quant.method != "none":
        p.append(f"peft.method: {method!r} trains every weight, and a {r.quant.method} base cannot be trained; "
                 "set quant.method: none (or peft.method: lora for QLoRA)")
    if not rules.deepspeed and (r.distributed.deepspeed_config is not None or r.distributed.engine == "deepspeed"):
        p.append(f"peft.method: {method!r} is not supported under DeepSpeed yet; use distributed.engine: ddp "
                 "(or auto without deepspeed_config)")
    elif not rules.sharded_base and r.distributed.engine == "fsdp":
        p.append(f"peft.method: {method!r} is not supported under FSDP yet; use distributed.engine: ddp or auto "
                 "(FSDP runs LoRA)")
    if rules.padded_batches and r.data.packing:
        p.append(f"data.packing: {method} adds virtual tokens to every sequence, so it needs one example per "
                 "padded row; set data.packing: false")
    if rules.padded_batches and r.data.padding_free is True:
        p.append(f"data.padding_free: {method} adds virtual tokens before every row, which a padding-free batch "
                 "(all rows in one) cannot hold; set data.padding_free: false (or auto, which pads for it)")
    return p


def compared_keys(r: Recipe) -> frozenset:
    """Keys read by the methods a recipe's own `compare.variants` names: such a recipe configures them all
    (`qtrain compare` gives each variant only its method's keys)."""
    if "variants" not in r.compare.explicit_keys:
        return frozenset()
    methods = {split_variant(v)[0] for v in r.compare.variants}
    return frozenset().union(*(METHOD_RULES[m].keys for m in methods if m in METHOD_RULES))


def split_variant(variant: str) -> tuple[str, str | None]:
    """`lora@nf4` -> ('lora', 'nf4'); `ia3` -> ('ia3', None); `qlora` -> ('lora', 'nf4'); `base` -> ('base', None)."""
    if variant == "qlora":
        return "lora", "nf4"
    method, _, quant = variant.partition("@")
    return method, (quant or None)


def check_variant(variant: str) -> list[str]:
    method, quant = split_variant(variant)
    if method != "base" and method not in METHOD_RULES:
        return [f"compare.variants: {variant!r} is not base or a method ({', '.join(METHOD_RULES)}), "
                "optionally with @nf4 or @none"]
    if quant is not None and (quant not in ("nf4", "none") or method == "base"):
        return [f"compare.variants: {variant!r}: the suffix must be @nf4 or @none on a method"]
    return []
