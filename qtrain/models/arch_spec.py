"""Where things sit in each model family: the one place that knows Llama's (or T5's) module names.

Methods ask it for default targets, where a bottleneck adapter goes, which blocks layer freezing
trains and which linears carry biases; the recompute policy asks it which projections are the
attention's. Names are relative to a block (one entry of a block list) and matched as module
paths inside it, so T5's encoder and decoder blocks (whose FFN sits at layer.1 and layer.2) and
fused projections (GPT-NeoX's query_key_value, Phi-3's qkv_proj) are described the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qtrain.errors import ConfigError


def _leaves(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The distinct leaf names of module paths, in order of first appearance."""
    return tuple(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    # Dotted paths of the block lists (nn.ModuleList), input side first: layer freezing counts
    # "top" blocks from the end of the last one (T5: the decoder).
    blocks: tuple[str, ...]
    # Linear leaf names inside the attention: every projection, the ones producing keys/values,
    # and the output projection (paths relative to a block, self- and cross-attention alike).
    attention_projections: tuple[str, ...]
    key_value: tuple[str, ...]
    attention_output: tuple[str, ...]
    # The feed-forward module (relative path inside a block; the first that exists), its linear
    # leaf names, and its output projection.
    mlp: tuple[str, ...]
    mlp_projections: tuple[str, ...]
    mlp_output: tuple[str, ...]
    fused_qkv: bool = False
    # Whether nothing after the FFN's output projection saves a tensor (Llama: the residual add that
    # ends the block), except a dropout under one of `ffn_output_dropout`'s config keys when its rate
    # is positive. Then gradient checkpointing's recompute stops before that projection's base
    # product and keeping its output buys nothing. Not T5: in fp16 it clamps the block's output.
    ffn_output_last: bool = True
    ffn_output_dropout: tuple[str, ...] = ()
    # Config flags that give the attention / FFN linears a bias (merging BitFit into a model whose
    # linears have none needs them); empty: the family's config cannot add biases.
    bias_flags: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def attention_leaves(self) -> tuple[str, ...]:
        return _leaves(self.attention_projections)

    def unneeded_outputs(self, config=None) -> tuple[str, ...]:
        """Leaf names of linears whose output no backward and no recompute needs: the FFN's output
        projection, unless a dropout (a positive rate in `config`, or no config to tell) follows it."""
        keys = self.ffn_output_dropout
        dropout = bool(keys) and (config is None or any(getattr(config, k, 0) for k in keys))
        if not self.ffn_output_last or dropout:
            return ()
        return _leaves(self.mlp_output)

    def default_targets(self) -> list[str]:
        """LoRA's default: every attention and FFN projection (leaf names, PEFT's target_modules form)."""
        return list(_leaves(self.attention_projections + self.mlp_projections))


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama",), ("model.layers",), _LLAMA_ATTN, ("self_attn.k_proj", "self_attn.v_proj"),
             ("self_attn.o_proj",), ("mlp",), _LLAMA_MLP, ("mlp.down_proj",),
             bias_flags={"attention_bias": _LLAMA_ATTN, "mlp_bias": _LLAMA_MLP}),
    ArchSpec("mistral", ("mistral", "qwen2", "qwen3"), ("model.layers",), _LLAMA_ATTN,
             ("self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",), ("mlp",), _LLAMA_MLP,
             ("mlp.down_proj",)),
    ArchSpec("phi3", ("phi3",), ("model.layers",), ("self_attn.qkv_proj", "self_attn.o_proj"),
             ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp",), ("mlp.gate_up_proj", "mlp.down_proj"),
             ("mlp.down_proj",), fused_qkv=True, ffn_output_dropout=("resid_pdrop",)),
    ArchSpec("gpt_neox", ("gpt_neox",), ("gpt_neox.layers",), ("attention.query_key_value", "attention.dense"),
             ("attention.query_key_value",), ("attention.dense",), ("mlp",),
             ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), ("mlp.dense_4h_to_h",), fused_qkv=True,
             ffn_output_dropout=("hidden_dropout",)),
    ArchSpec("t5", ("t5", "mt5"), ("encoder.block", "decoder.block"),
             tuple(f"{a}.{p}" for a in ("layer.0.SelfAttention", "layer.1.EncDecAttention") for p in "qkvo"),
             ("layer.0.SelfAttention.k", "layer.0.SelfAttention.v", "layer.1.EncDecAttention.k",
              "layer.1.EncDecAttention.v"),
             ("layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"),
             ("layer.1.DenseReluDense", "layer.2.DenseReluDense"),
             tuple(f"{f}.{p}" for f in ("layer.1.DenseReluDense", "layer.2.DenseReluDense")
                   for p in ("wi", "wi_0", "wi_1", "wo")),
             ("layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo"), ffn_output_last=False),
)


def spec_for_type(model_type: str) -> ArchSpec | None:
    return next((s for s in SPECS if model_type in s.model_types), None)


def arch_spec(model: nn.Module, what: str = "this method") -> ArchSpec:
    """The spec of a loaded model's family; ConfigError naming the model type when there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = spec_for_type(model_type or "")
    if spec is None:
        known = ", ".join(t for s in SPECS for t in s.model_types)
        raise ConfigError(f"model type {model_type!r} has no architecture spec (known: {known}), which {what} "
                          "needs; give peft.targets explicitly, or add the family to qtrain/models/arch_spec.py")
    return spec


def block_lists(model: nn.Module, spec: ArchSpec) -> list[tuple[str, nn.ModuleList]]:
    """(path, ModuleList) of each block list of `model`, input side first."""
    return [(path, model.get_submodule(path)) for path in spec.blocks]


def in_block(block: nn.Module, paths: tuple[str, ...]) -> list[str]:
    """The paths of `paths` that exist inside `block` (e.g. T5's FFN at layer.1 or layer.2)."""
    names = {n for n, _ in block.named_modules()}
    return [p for p in paths if p in names]


def present_leaves(model: nn.Module, leaves: list[str], linear_types: tuple[type, ...]) -> list[str]:
    """`leaves` that name at least one linear layer of `model`, in order (T5 v1.1 has wi_0/wi_1, not wi)."""
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear_types)}
    return [leaf for leaf in leaves if leaf in found]


def declare_biases(model: nn.Module, gained: list[str]) -> None:
    """Declare biases that merging gave bias-less linears (BitFit), or `from_pretrained` would drop them.

    For each of the family's bias flags whose group of linears gained one, set the flag in the config
    and give every linear of the group a bias (zeros where the adapter added none). A linear outside
    every such group is refused: its family's config cannot declare a bias there.
    """
    if not gained:
        return
    model_type = getattr(model.config, "model_type", "")
    spec = spec_for_type(model_type)
    left = list(gained)
    for flag, rel_paths in (spec.bias_flags.items() if spec else []):
        group = [f"{path}.{i}.{rel}" for path, blocks in block_lists(model, spec)
                 for i, block in enumerate(blocks) for rel in in_block(block, rel_paths)]
        if not any(name in left for name in group):
            continue
        setattr(model.config, flag, True)
        for name in group:
            linear = model.get_submodule(name)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device), requires_grad=False)
        left = [n for n in left if n not in group]
    if left:
        raise ConfigError(f"merge: {left[0]} would need a bias (a BitFit adapter), but a {model_type} model's config "
                          "cannot declare one there, so the saved model would lose it; serve the adapter with "
                          "qtrain generate instead")
