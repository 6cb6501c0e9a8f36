"""The architecture spec: every family's paths exist in a real model of it; targets auto / all-linear."""

import pytest
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.models.arch_spec import arch_spec, block_lists, in_block
from qtrain.peft.layer import LINEAR_TYPES, adapted_linears, prepare_recompute
from qtrain.peft.lora import inject_lora

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 64}
MODELS = {
    "llama": ("llama", {**SMALL, "num_key_value_heads": 2}),
    "qwen2": ("qwen2", {**SMALL, "num_key_value_heads": 2}),
    "phi3": ("phi3", {**SMALL, "num_key_value_heads": 2, "pad_token_id": 0}),
    "gpt_neox": ("gpt_neox", SMALL),
    "t5": ("t5", {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "vocab_size": 64,
                  "feed_forward_proj": "gated-gelu"}),
    "t5_relu": ("t5", {"d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "vocab_size": 64}),
}
AUTO = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "t5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "t5_relu": ["q", "k", "v", "o", "wi", "wo"],
}


def _model(key: str):
    model_type, kw = MODELS[key]
    config = AutoConfig.for_model(model_type, **kw)
    cls = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    with init_empty_weights():
        return cls.from_config(config)


@pytest.mark.parametrize("key", list(MODELS))
def test_every_block_has_its_attention_output_ffn_and_projections(key):
    model = _model(key)
    spec = arch_spec(model)
    for path, blocks in block_lists(model, spec):
        for block in blocks:
            assert in_block(block, spec.attention_output), path
            assert len(in_block(block, spec.mlp)) == 1 and len(in_block(block, spec.mlp_output)) == 1, path
            assert in_block(block, spec.key_value)
            linears = {n for n, m in block.named_modules() if isinstance(m, LINEAR_TYPES)}
            wanted = set(in_block(block, spec.attention_projections + spec.mlp_projections))
            assert wanted == linears, (path, linears - wanted)  # the spec names every linear of a block


@pytest.mark.parametrize("key", list(MODELS))
def test_auto_targets_are_every_attention_and_ffn_projection_and_all_linear_spares_the_head(key):
    model = _model(key)
    names = inject_lora(model, PeftConfig(r=2))
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(AUTO[key])
    head = model.get_output_embeddings()
    model = _model(key)
    names = inject_lora(model, PeftConfig(r=2, targets="all-linear"))
    assert sorted({n.rsplit(".", 1)[-1] for n in names}) == sorted(AUTO[key])
    assert all(model.get_submodule(n) is not head for n in names)


@pytest.mark.parametrize("key, dropout", [("llama", None), ("qwen2", None), ("phi3", "resid_pdrop"),
                                          ("gpt_neox", "hidden_dropout"), ("t5", None)])
def test_the_ffn_output_projection_keeps_its_output_only_where_a_recompute_needs_it(key, dropout):
    """Under `mlp` the FFN's output projection keeps nothing when only a residual add follows it
    (the recompute stops before it); a dropout after it (rate > 0) or T5's block end needs it."""
    rates = [0.0, 0.1] if dropout else [None]
    for rate in rates:
        model_type, kw = MODELS[key]
        config = AutoConfig.for_model(model_type, **kw, **({dropout: rate} if dropout else {}))
        with init_empty_weights():
            model = (AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM).from_config(config)
        inject_lora(model, PeftConfig(r=2))
        prepare_recompute(model, "mlp")
        spec = arch_spec(model)
        out = {p.rsplit(".", 1)[-1] for p in spec.mlp_output}
        ffn = {p.rsplit(".", 1)[-1] for p in spec.mlp_projections}
        leaves = {n.rsplit(".", 1)[-1]: m.keep_output for n, m in adapted_linears(model).items()}
        needed = key == "t5" or bool(rate)
        expected = (ffn & set(leaves)) - (set() if needed else out)
        assert {leaf for leaf, keep in leaves.items() if keep} & ffn == expected, (key, rate, leaves)


@pytest.mark.parametrize("key", ["t5", "gpt_neox", "phi3"])
def test_attention_recompute_keeps_the_families_own_attention_projections(key):
    model = _model(key)
    inject_lora(model, PeftConfig(r=2))
    prepare_recompute(model, "attention")
    kept = {n.rsplit(".", 1)[-1] for n, m in adapted_linears(model).items() if m.keep_output}
    assert kept == set(arch_spec(model).attention_leaves()) and kept


def test_auto_targets_on_an_unknown_family_ask_for_explicit_targets():
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=64)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.config.model_type = "my_arch"
    with pytest.raises(ConfigError, match="model type 'my_arch' has no architecture spec.*peft.targets"):
        inject_lora(model, PeftConfig(r=2))
