"""Prefix tuning: trainable key/value prefixes for every attention layer (Li & Liang 2021).

The prefixes enter through the model's own cache API: the sequence hook (qtrain.peft.sequence)
passes a cache whose layers already hold k positions and extends the attention mask by k, so the
real tokens sit at positions k.. (as after a k-token prompt) and attend to the prefixes in every
layer. Training and eval use a *read-only* cache: its `update` returns prefix + new states and
stores nothing, so a layer recomputed by gradient checkpointing sees exactly what its first
forward saw. That is why gradient checkpointing works here (peft refuses it): the decoder layers
are told the cache is read-only (transformers' `_can_checkpoint_with_cache`), and it is. Generation
gets an ordinary growing cache seeded with the prefixes.

With `prefix_projection` (default) the prefixes are trained through Li & Liang's
reparameterization, embedding [k, hidden] -> Linear -> tanh -> Linear [k, layers·2·kv_dim]; the
MLP is folded away at save: the artifact holds its output. Without it, the prefixes are trained
directly, starting from the keys/values the model computes for k sampled vocabulary tokens.

The artifact is peft's PREFIX_TUNING format: `prompt_embeddings` [k, layers·2·kv_heads·head_dim]
in peft's (grouped-query) layout, `prefix_projection: false`. Checkpoints also hold the MLP
(`prefix_state.safetensors`) so resume is exact. Decoder-only models only: T5's cross-attention
cache would need its own prefix handling (use prompt_tuning for T5). Merging is refused.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from qtrain.config.schema import PeftConfig
from qtrain.errors import CheckpointError
from qtrain.models.arch import model_is_encoder_decoder
from qtrain.peft import artifact
from qtrain.peft.layer import freeze, prepare_recompute
from qtrain.peft.method import Method, task_type_of
from qtrain.peft.sequence import SequenceAdapter, attach, attach_saved, sequence_adapter, unwrap

KEY = "prompt_embeddings"


class ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer holding fixed prefix states: `update` returns prefix + new states and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=-2))


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder-only model's attention."""
    c = model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head_dim


def split_layers(prefixes: torch.Tensor, shape: tuple[int, int, int], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """[k, layers·2·heads·dim] (peft's layout) -> per layer (keys, values), each [batch, heads, k, dim]."""
    layers, heads, dim = shape
    per = prefixes.view(prefixes.shape[0], layers * 2, heads, dim).permute(1, 2, 0, 3)
    return [(per[2 * i].unsqueeze(0).expand(batch, -1, -1, -1), per[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1))
            for i in range(layers)]


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by (`cache` in recent transformers, else past_key_values)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PrefixEncoder(SequenceAdapter):
    def __init__(self, shape: tuple[int, int, int], init: torch.Tensor, hidden: int | None) -> None:
        super().__init__()
        self.shape = shape
        layers, heads, dim = shape
        self.embedding = nn.Parameter(init.detach().float().clone())
        self.mlp = None
        if hidden is not None:  # Li & Liang's reparameterization, folded away at save
            self.mlp = nn.Sequential(nn.Linear(init.shape[1], hidden), nn.Tanh(),
                                     nn.Linear(hidden, layers * 2 * heads * dim)).to(init.device)

    def prefixes(self) -> torch.Tensor:
        """[k, layers·2·kv_heads·head_dim]: what the layers see (and what the artifact holds)."""
        return self.mlp(self.embedding) if self.mlp is not None else self.embedding

    def transform(self, model: nn.Module, kwargs: dict, generation: bool) -> tuple[dict, int]:
        kw = dict(kwargs)
        batch = kw["input_ids"].shape[0]
        pairs = split_layers(self.prefixes(), self.shape, batch)
        k = pairs[0][0].shape[2]
        kw[cache_kwarg(model)] = (DynamicCache([(a.detach().clone(), b.detach().clone()) for a, b in pairs])
                                  if generation else Cache(layers=[ReadOnlyPrefixLayer(a, b) for a, b in pairs]))
        mask = kw.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(kw["input_ids"])
        kw["attention_mask"] = torch.cat([mask.new_ones(batch, k), mask], dim=1)
        return kw, 0


@torch.no_grad()
def sampled_token_prefixes(model: nn.Module, k: int) -> torch.Tensor:
    """The keys/values the model computes for k sampled vocabulary tokens, in peft's layout."""
    table = model.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (1, k), device=table.device)
    cache = model(input_ids=ids, use_cache=True).past_key_values
    layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # [heads, k, dim] each
    stacked = torch.stack([t for pair in layers for t in pair])  # [layers·2, heads, k, dim]
    return stacked.permute(2, 0, 1, 3).reshape(k, -1).float()


class PrefixTuning(Method):
    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    fused_loss = False
    state_file = "prefix_state.safetensors"
    merge_refusal = ("prefix tuning adds key/value positions to every attention layer, not a change to any weight: "
                     "there is nothing to fold into the base; serve the adapter with qtrain generate instead")

    def inject(self, model: nn.Module, cfg: PeftConfig, tokenizer=None) -> list[str]:
        if model_is_encoder_decoder(model):
            raise self.refuse("implemented for decoder-only models; T5's cross-attention cache would need its own "
                              "prefix handling. Use peft.method: prompt_tuning for T5")
        freeze(model)
        shape, k = kv_shape(model), cfg.num_virtual_tokens
        if cfg.prefix_projection:
            table = model.get_input_embeddings().weight.detach()
            init = table[torch.randint(0, table.shape[0], (k,), device=table.device)]
            hidden = cfg.prefix_hidden_size or table.shape[1]
        else:
            init, hidden = sampled_token_prefixes(model, k), None
        attach(model, PrefixEncoder(shape, init, hidden))
        return []

    def enable_checkpointing(self, model: nn.Module, recompute: str) -> None:
        """The prefix cache only reads (see the module docstring): the decoder layers keep it under checkpointing."""
        prepare_recompute(model, recompute)
        layers = [m for m in unwrap(model).modules() if hasattr(type(m), "_can_checkpoint_with_cache")]
        if not layers:
            raise self.refuse("with train.gradient_checkpointing this transformers version drops the prefix cache in "
                              "checkpointed layers; upgrade transformers or set train.gradient_checkpointing: false")
        for layer in layers:
            layer._can_checkpoint_with_cache = True

    def describe(self, cfg: PeftConfig, names: list[str]) -> str:
        how = "through an MLP" if cfg.prefix_projection else "directly"
        return f"prefix tuning: {cfg.num_virtual_tokens} key/value positions per layer, trained {how}"

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable tensor of the prefix encoder (resume); the artifact is its folded output."""
        adapter = sequence_adapter(model)
        return {f"prefix.{n}": p for n, p in adapter.named_parameters()} if adapter is not None else {}

    def artifact_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return artifact.to_cpu({KEY: sequence_adapter(model).prefixes().float()})

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A saved (folded) prefix into an injected model: it drops the MLP and trains the prefixes directly."""
        adapter = sequence_adapter(model)
        layers, heads, dim = adapter.shape
        k, device = adapter.embedding.shape[0], adapter.embedding.device
        adapter.mlp = None
        adapter.embedding = nn.Parameter(torch.zeros(k, layers * 2 * heads * dim, device=device))
        artifact.load_named({KEY: adapter.embedding}, tensors)

    def artifact_config(self, model: nn.Module, cfg: PeftConfig, base_model: str) -> dict:
        layers, heads, dim = kv_shape(model)
        return {"peft_type": self.peft_type, "task_type": task_type_of(model), "base_model_name_or_path": base_model,
                "num_virtual_tokens": cfg.num_virtual_tokens, "token_dim": heads * dim, "num_attention_heads": heads,
                "num_layers": layers, "num_transformer_submodules": 1, "encoder_hidden_size": cfg.prefix_hidden_size
                or model.config.hidden_size, "prefix_projection": False, "inference_mode": True,
                "modules_to_save": None}

    def config_from_artifact(self, config: dict) -> PeftConfig:
        return PeftConfig(method=self.name, num_virtual_tokens=int(config["num_virtual_tokens"]),
                          prefix_projection=False)

    def attach(self, model: nn.Module, name: str, cfg: PeftConfig, tensors: dict[str, torch.Tensor],
               source: str) -> None:
        if model_is_encoder_decoder(model):
            raise CheckpointError(f"{source}: a prefix-tuning adapter, which qtrain runs on decoder-only models only")
        shape = kv_shape(model)
        device = model.get_input_embeddings().weight.device
        encoder = PrefixEncoder(shape, torch.zeros(cfg.num_virtual_tokens, shape[0] * 2 * shape[1] * shape[2],
                                                   device=device), None)
        attach_saved(model, name, encoder, {KEY: encoder.embedding}, tensors, source)
