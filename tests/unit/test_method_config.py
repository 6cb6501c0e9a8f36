"""The recipe side of the methods: explicit keys a method does not read, its requirements, bad values."""

import pytest

from qtrain.config import recipe_from_dict
from qtrain.config.methods import METHOD_RULES
from qtrain.config.schema import PeftConfig
from qtrain.errors import ConfigError
from qtrain.peft.registry import METHODS


def recipe(peft: dict, **sections) -> dict:
    return {"output_dir": "out", "model": {"path": "m"}, "data": {"path": "d.jsonl", "packing": False},
            "peft": peft, **sections}


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data)
    return info.value.problems


def test_registry_and_recipe_rules_name_the_same_methods():
    assert set(METHODS) == set(METHOD_RULES)
    for name, method in METHODS.items():
        assert method.name == name and method.rules is METHOD_RULES[name]


@pytest.mark.parametrize("method", list(METHOD_RULES))
def test_every_method_takes_the_defaults_and_its_own_keys(method):
    cfg = recipe_from_dict(recipe({"method": method}, quant={"method": "none"})).peft
    assert cfg.method == method and cfg.explicit_keys == {"method"}


def test_a_key_the_method_does_not_read_is_an_error_naming_it():
    assert problems(recipe({"method": "prompt_tuning", "r": 8, "targets": ["q_proj"]})) == [
        "peft.r does not apply to prompt_tuning; remove it (read by: lora, dora)",
        "peft.targets does not apply to prompt_tuning; remove it (read by: lora, dora, ia3, bitfit, diff_pruning)"]
    assert problems(recipe({"method": "lora", "num_virtual_tokens": 8})) == [
        "peft.num_virtual_tokens does not apply to lora; remove it (read by: prompt_tuning, prefix_tuning)"]
    # the same values left at their defaults, or built in code, are fine
    assert recipe_from_dict(recipe({"method": "prompt_tuning"})).peft.r == 16
    assert PeftConfig(method="ia3", r=4).explicit_keys == frozenset()


def test_overrides_count_as_explicit(tmp_path):
    from qtrain.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("output_dir: out\nmodel: {path: m}\ndata: {path: d.jsonl, packing: false}\npeft: {method: lora}\n")
    with pytest.raises(ConfigError, match="peft.rslora does not apply to ia3"):
        load_recipe(path, ["peft.method=ia3", "peft.rslora=true"])


@pytest.mark.parametrize("peft,expected", [
    ({"method": "prompt_tuning", "num_virtual_tokens": 0}, "peft.num_virtual_tokens: must be > 0"),
    ({"method": "prompt_tuning", "prompt_init": "text"}, "peft.prompt_init: 'text' needs peft.prompt_init_text"),
    ({"method": "prompt_tuning", "prompt_init_text": "hi"}, "peft.prompt_init_text: set, but peft.prompt_init is"),
    ({"method": "prompt_tuning", "prompt_init": "zeros"}, "peft.prompt_init: must be one of"),
    ({"method": "prefix_tuning", "prefix_hidden_size": -1}, "peft.prefix_hidden_size: must be > 0"),
    ({"method": "bottleneck", "placement": "middle"}, "peft.placement: must be one of"),
    ({"method": "bottleneck", "reduction_factor": 0}, "peft.reduction_factor: must be > 0"),
    ({"method": "compacter", "phm_dim": 0}, "peft.phm_dim: must be > 0"),
    ({"method": "compacter", "activation": "swish"}, "peft.activation: must be one of"),
    ({"method": "freeze", "layers_to_train": 0}, "peft.layers_to_train: must be > 0"),
    ({"method": "freeze", "layer_range": [3, 1]}, "peft.layer_range: must be [start, end)"),
    ({"method": "freeze", "layer_range": [0, 1], "layers_to_train": 1}, "peft.layer_range: set together with"),
    ({"method": "diff_pruning", "target_sparsity": 1.0}, "peft.target_sparsity: must be in [0, 1)"),
    ({"method": "diff_pruning", "l0_weight": -1}, "peft.l0_weight: must be >= 0"),
    ({"method": "ia3", "feedforward_targets": []}, "peft.feedforward_targets: empty list"),
    ({"method": "bitfit", "targets": "(["}, "peft.targets: invalid regex"),
    ({"method": "dora", "dropout": 1.0}, "peft.dropout: must be in [0, 1)"),
])
def test_bad_values_of_each_methods_keys(peft, expected):
    found = problems(recipe(peft))
    assert any(p.startswith(expected) for p in found), found


def test_sequence_methods_refuse_packed_batches():
    data = recipe({"method": "prefix_tuning"})
    data["data"]["packing"] = True
    assert problems(data) == ["data.packing: prefix_tuning adds virtual tokens to every sequence, so it needs one "
                              "example per padded row; set data.packing: false"]
    assert METHODS["prefix_tuning"].needs_padded_batches and not METHODS["lora"].needs_padded_batches


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_sequence_methods_refuse_padding_free_batches(method):
    data = recipe({"method": method})
    data["data"]["padding_free"] = True
    assert problems(data) == [f"data.padding_free: {method} adds virtual tokens before every row, which a "
                              "padding-free batch (all rows in one) cannot hold; set data.padding_free: false "
                              "(or auto, which pads for it)"]
    for value in ("auto", False):  # auto resolves to padded rows for these methods (train.packing_check)
        data["data"]["padding_free"] = value
        assert recipe_from_dict(data).data.padding_free == value
    data["peft"]["method"], data["data"]["padding_free"] = "lora", True
    assert recipe_from_dict(data).data.padding_free is True


def test_a_compare_recipe_may_set_the_keys_of_the_methods_it_compares():
    data = recipe({"method": "lora", "r": 8, "num_virtual_tokens": 4, "reduction_factor": 8},
                  compare={"variants": ["base", "lora", "prompt_tuning", "bottleneck"]})
    assert recipe_from_dict(data).peft.num_virtual_tokens == 4
    data["compare"]["variants"] = ["base", "lora", "prompt_tuning"]
    assert problems(data) == ["peft.reduction_factor does not apply to lora; remove it (read by: bottleneck, "
                              "compacter)"]
