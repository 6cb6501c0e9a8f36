"""A model's shape from its config alone: every linear layer and the parameter counts the planner needs.

No weights are read. The transformers config comes from `model.path`'s config.json or from the
recipe's `model.from_config` (vocab size from the tokenizer, as the run's base is written), and the
model is instantiated on the meta device -- the same skeleton the loader builds -- so which linears
are quantized (`quantizable_linears`) and which get an adapter (`peft.targets`) are decided by the
loader's and the injector's own rules, not by a copy of them.

The activation model (activations.py) is written for Llama-style decoder blocks: attention with
q/k/v (or fused qkv) and o projections, a gated MLP (gate/up or fused gate_up, then down). Each
linear of a decoder layer gets one of four roles by its leaf name; a model whose layers hold a
linear outside `ROLES` is refused with the reason, rather than estimated wrongly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError, ModelError

# Leaf name -> role in a decoder layer. The input of each role's linears is a different tensor
# (attn_in: the first norm's output; attn_out: attention's output; mlp_in: the second norm's
# output; mlp_out: the gated product), which decides what a layer saves for backward.
ROLES = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
    "down_proj": "mlp_out",
}
_LAYER = re.compile(r"\.layers\.(\d+)\.")
# The fine-tuning methods the memory model describes (adapter tensors, activations, optimizer state).
MODELED_METHODS = ("lora", "full")


@dataclass(frozen=True)
class Linear:
    name: str
    layer: int | None
    role: str | None
    in_features: int
    out_features: int
    quantized: bool
    adapted: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the memory model reads: dimensions, every linear, and the parameters outside quantized linears."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[Linear, ...]
    total_params: int     # every parameter the linears and the rest stand for (tied ones once)
    dense_params: int     # parameters stored in the model dtype: embeddings, norms, head, biases, unquantized linears
    dense_numels: tuple[int, ...]  # each of those parameters' size (optimizer rules are per tensor)
    buffer_bytes: int     # real buffers of the skeleton (rotary tables)
    plain_head: bool = True  # a head the fused linear + cross-entropy can replace (models.arch.plain_lm_head)

    def layer_linears(self, layer: int = 0) -> tuple[Linear, ...]:
        return tuple(lin for lin in self.linears if lin.layer == layer)

    @property
    def adapted(self) -> tuple[Linear, ...]:
        return tuple(lin for lin in self.linears if lin.adapted)


def transformers_config(recipe: Recipe) -> Any:
    """The transformers config of the recipe's base, from `model.path` or `model.from_config`."""
    m = recipe.model
    if m.path is not None:
        from qtrain.models.arch import read_config

        path = Path(m.path)
        if not (path / "config.json").is_file():
            raise ModelError(f"model.path: {path} has no config.json; point model.path at a Hugging Face model dir "
                             "(the planner reads config.json only, no weights)")
        return read_config(path, m.trust_remote_code)
    from qtrain.models.build import model_config
    from qtrain.models.tokenizer import load_tokenizer

    return model_config(m.from_config, load_tokenizer(m.tokenizer, trust_remote_code=m.trust_remote_code))


def _skeleton(config: Any, trust_remote_code: bool):
    """The model on the meta device, as the loader builds it; ModelError if transformers cannot."""
    from accelerate import init_empty_weights

    from qtrain.models.arch import auto_model_class

    try:
        with init_empty_weights(include_buffers=False):
            return auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for configs it cannot build
        raise ModelError(f"qtrain plan: cannot build a {getattr(config, 'model_type', '?')!r} model from its "
                         f"config: {exc}") from None


def _linears(model, quantize: bool, targets) -> tuple[Linear, ...]:
    """Every nn.Linear; `targets` None means no adapter (full fine-tuning), else LoRA's own match
    (`auto` / `all-linear` resolved by the architecture spec, as the injector does)."""
    from torch import nn

    from qtrain.models.load import quantizable_linears
    from qtrain.peft.registry import get_method

    quantized = quantizable_linears(model) if quantize else set()
    adapted = set(get_method("lora").target_names(model, targets, (nn.Linear,))) if targets is not None else set()
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        layer = _LAYER.search(name)
        leaf = name.rsplit(".", 1)[-1]
        out.append(Linear(name, int(layer.group(1)) if layer else None, ROLES.get(leaf) if layer else None,
                          mod.in_features, mod.out_features, name in quantized, name in adapted))
    return tuple(out)


def _check_modeled(config: Any, linears: tuple[Linear, ...]) -> None:
    """Refuse what the activation model does not describe, naming the reason."""
    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"qtrain plan: model_type {kind!r} is an encoder-decoder model; the memory model covers "
                         "decoder-only Llama-style models (llama, mistral, qwen2, ...) so far")
    odd = sorted({lin.name.rsplit(".", 1)[-1] for lin in linears if lin.layer is not None and lin.role is None})
    if odd:
        raise ModelError(f"qtrain plan: model_type {kind!r} has decoder-layer linears {', '.join(odd)} that the "
                         f"memory model does not place (it knows {', '.join(sorted(ROLES))})")
    if not any(lin.role == "mlp_in" and "gate" in lin.name.rsplit(".", 1)[-1] for lin in linears):
        raise ModelError(f"qtrain plan: model_type {kind!r} has no gated MLP (gate_proj); the memory model covers "
                         "Llama-style blocks so far")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not isinstance(getattr(config, k, None), int)]
    if missing:
        raise ModelError(f"qtrain plan: model_type {kind!r} has no {', '.join(missing)} in its config")


def check_method(recipe: Recipe) -> None:
    """Refuse a method the memory model does not describe (a run's header then says 'no estimate')."""
    if recipe.peft.method not in MODELED_METHODS:
        raise ConfigError(f"qtrain plan: peft.method: {recipe.peft.method!r} is not in the memory model yet (it "
                          f"covers {', '.join(MODELED_METHODS)}); measure its first steps instead with "
                          "python -m qtrain.train.memtrack RECIPE --out DIR")


def model_shape(recipe: Recipe) -> ModelShape:
    """Read the recipe's base model shape (config only) with the recipe's quantization and targets applied."""
    from qtrain.models.arch import plain_lm_head

    check_method(recipe)
    config = transformers_config(recipe)
    model = _skeleton(config, recipe.model.trust_remote_code)
    quantize = recipe.quant.method == "nf4" and recipe.peft.method != "full"
    targets = recipe.peft.targets if recipe.peft.method == "lora" else None
    linears = _linears(model, quantize, targets)
    _check_modeled(config, linears)
    quantized = {f"{lin.name}.weight" for lin in linears if lin.quantized}
    params = dict(model.named_parameters())
    dense_numels = tuple(p.numel() for name, p in params.items() if name not in quantized)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                      heads, getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size,
                      linears, sum(p.numel() for p in params.values()), sum(dense_numels), dense_numels, buffers,
                      plain_lm_head(model))
