"""Recipe loading: safe YAML, `key.sub=value` overrides, the typed schema, and one ConfigError
that lists every problem with its key path."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qtrain.config import Recipe, apply_overrides, load_recipe, recipe_from_dict
from qtrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
QUICKSTART_DICT = yaml.safe_load(QUICKSTART.read_text())


def quickstart(**sections) -> dict:
    """The quickstart recipe as a dict, with `sections` merged into it one level deep."""
    data = copy.deepcopy(QUICKSTART_DICT)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name].update(value)
        else:
            data[name] = value
    return data


def config_error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data)
    return info.value


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- shipped recipes -------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    assert isinstance(load_recipe(path), Recipe)


def test_quickstart_values_arrive_typed():
    r = load_recipe(QUICKSTART)
    assert r.model.from_config["model_type"] == "llama" and r.model.path is None
    assert r.peft.alpha == 32.0 and isinstance(r.peft.alpha, float)  # YAML int into a float field
    assert r.train.lr == pytest.approx(3e-3) and r.train.max_steps == 150
    assert r.data.format == "instruction" and r.checkpoint.resume == "auto"


# --- unknown keys, wrong types, bad values: all reported at once ---------------------------------

def test_unknown_keys_are_named_with_their_full_path():
    err = config_error(quickstart(trian={}, train={"max_step": 3}, peft={"rank": 4},
                                  model={"from_config": {"model_type": "llama"}, "tokenizer": "t", "dtpye": "x"}))
    text = str(err)
    for path in ("trian: unknown key", "train.max_step: unknown key", "peft.rank: unknown key",
                 "model.dtpye: unknown key"):
        assert path in text
    assert len(err.problems) == 4
    assert "max_steps" in text  # the known keys are listed, so the typo is easy to fix


def test_wrong_types_are_named_with_their_full_path():
    err = config_error(quickstart(train={"max_steps": "10", "gradient_checkpointing": "yes"},
                                  peft={"targets": 5, "r": 4.0}, quant="nf4", seed=True))
    text = str(err)
    for path in ("train.max_steps: expected int, got str '10'", "train.gradient_checkpointing: expected bool",
                 "peft.targets: expected", "peft.r: expected int, got float", "quant: expected a mapping",
                 "seed: expected int, got bool"):
        assert path in text
    assert len(err.problems) == 6


def test_list_items_are_checked_one_by_one():
    text = str(config_error(quickstart(peft={"targets": ["q_proj", 3]})))
    assert "peft.targets: expected list of str or str" in text


def test_bad_values_are_named_with_their_full_path():
    err = config_error(quickstart(peft={"r": 0, "dropout": 1.0}, quant={"blocksize": 100},
                                  kernels="cuda", data={"max_len": 4, "overlong": "cut"}, output_dir=""))
    text = str(err)
    for path in ("peft.r: must be > 0, got 0", "peft.dropout: must be in [0, 1)", "quant.blocksize: must be one of",
                 "kernels: must be one of 'auto', 'triton', 'torch'; got 'cuda'", "data.max_len: must be >= 8",
                 "data.overlong: must be one of", "output_dir: required"):
        assert path in text
    assert len(err.problems) == 7


@pytest.mark.parametrize("r", [0, -1])
def test_lora_rank_must_be_positive(r):
    assert config_error(quickstart(peft={"r": r})).problems == [f"peft.r: must be > 0, got {r}"]


def test_unknown_key_wrong_type_and_bad_value_in_one_error():
    err = config_error(quickstart(train={"lr": "fast", "max_steps": 0, "epochs": 3}))
    assert sorted(p.split(":")[0] for p in err.problems) == ["train.epochs", "train.lr", "train.max_steps"]
    assert str(err).startswith("3 problems in recipe:")


def test_model_needs_exactly_one_source_and_a_tokenizer_with_from_config():
    both = config_error(quickstart(model={"path": "some/dir"}))
    assert "model: set exactly one of model.path" in str(both)
    no_tok = config_error(quickstart(model={"tokenizer": None}))
    assert no_tok.problems == ["model.tokenizer: required with model.from_config (a local tokenizer dir)"]


def test_kernels_triton_is_a_valid_recipe_value():
    # Refusing it is the trainer's job (it depends on the build), not the schema's.
    assert recipe_from_dict(quickstart(kernels="triton")).kernels == "triton"


# --- numbers -------------------------------------------------------------------------------------

def test_yaml_1_1_float_strings_are_accepted_for_float_fields(tmp_path):
    # YAML 1.1 reads `2e-4` (no dot) and `1e3` as strings; a float field takes them as numbers.
    assert yaml.safe_load("lr: 2e-4")["lr"] == "2e-4"
    text = QUICKSTART.read_text().replace("lr: 3.0e-3", "lr: 2e-4").replace("{method: lora}", "{method: lora, alpha: 1e3}")
    r = load_recipe(write(tmp_path / "r.yaml", text))
    assert r.train.lr == 2e-4 and r.peft.alpha == 1000.0


def test_numeric_strings_are_not_accepted_for_int_fields():
    assert config_error(quickstart(train={"max_steps": "10"})).problems == [
        "train.max_steps: expected int, got str '10'"]
    assert config_error(quickstart(train={"max_steps": 10.0})).problems == [
        "train.max_steps: expected int, got float 10.0"]


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan", "-inf", 10**400],
                         ids=["nan", "inf", "str-nan", "str-inf", "huge-int"])
def test_float_fields_refuse_non_finite_numbers(value):
    # nan passes every range check (`nan < 0` is False), so it must be refused by type.
    err = config_error(quickstart(train={"lr": value}))
    assert err.problems[0].startswith("train.lr: must be a finite number")


def test_bools_are_not_numbers():
    err = config_error(quickstart(train={"lr": True, "max_steps": False}))
    assert len(err.problems) == 2 and all("got bool" in p for p in err.problems)


# --- peft.targets -------------------------------------------------------------------------------

def test_targets_as_a_regex_string():
    assert recipe_from_dict(quickstart(peft={"targets": r".*\.(q|v)_proj"})).peft.targets == r".*\.(q|v)_proj"


@pytest.mark.parametrize("pattern", ["(q_proj", "a{4294967296}", "(" * 1500 + ")" * 1500],
                         ids=["unbalanced", "huge-repeat", "deep-nesting"])
def test_targets_that_are_not_a_usable_regex(pattern):
    err = config_error(quickstart(peft={"targets": pattern}))
    assert len(err.problems) == 1 and err.problems[0].startswith("peft.targets: invalid regex")


def test_empty_target_list():
    assert "peft.targets: empty list" in str(config_error(quickstart(peft={"targets": []})))


def test_field_map_keys_must_be_strings():
    err = config_error(quickstart(data={"fields": {1: "instruction", "response": 2}}))
    assert sorted(err.problems) == ["data.fields.1: keys must be strings, got int 1; quote the key",
                                    "data.fields.response: expected str, got int 2"]


# --- YAML files ---------------------------------------------------------------------------------

def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "output_dir: x\ntrain: {max_steps: 3\nseed: 1\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    text = str(info.value)
    assert text.startswith("malformed YAML at line ") and str(path) in text and "fix the syntax" in text


@pytest.mark.parametrize("value", ["2024-13-45", "!!int abc", "!!timestamp nope"])
def test_yaml_values_that_cannot_be_built_are_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_recipe(write(tmp_path / "r.yaml", f"output_dir: {value}\n"))


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    path = write(tmp_path / "evil.yaml", f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="malformed YAML") as info:
        load_recipe(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping of sections, got list"):
        load_recipe(write(tmp_path / "r.yaml", "- a\n- b\n"))


def test_empty_recipe_file_reports_what_is_required(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path / "r.yaml", "# nothing\n"))
    text = str(info.value)
    assert "output_dir: required" in text and "data.path: required" in text and "model: set exactly one" in text


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_problems_name_the_recipe_file(tmp_path):
    path = write(tmp_path / "r.yaml", QUICKSTART.read_text() + "extra: 1\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert info.value.source == str(path) and str(info.value).startswith("extra: unknown key")


# --- overrides ----------------------------------------------------------------------------------

def test_overrides_parse_values_as_yaml():
    data = apply_overrides(quickstart(), ["train.max_steps=20", "train.lr=1e-3", "peft.targets=[q_proj, v_proj]",
                                          "model.tokenizer=null", "data.packing=false", "data.path=a=b.jsonl",
                                          "output_dir="])
    assert data["train"]["max_steps"] == 20 and data["train"]["lr"] == "1e-3"
    assert data["peft"]["targets"] == ["q_proj", "v_proj"] and data["model"]["tokenizer"] is None
    assert data["data"]["packing"] is False and data["data"]["path"] == "a=b.jsonl" and data["output_dir"] == ""


def test_overrides_create_nested_keys():
    assert apply_overrides({}, ["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    r = recipe_from_dict(apply_overrides(quickstart(), ["data.fields.prompt=instruction",
                                                        "model.from_config.rope_theta=10000.0"]))
    assert r.data.fields == {"prompt": "instruction"} and r.model.from_config["rope_theta"] == 10000.0


def test_later_override_wins():
    assert apply_overrides({}, ["seed=1", "seed=2"]) == {"seed": 2}


def test_null_override_sets_none_and_the_schema_judges_it():
    r = recipe_from_dict(apply_overrides(quickstart(), ["train.grad_clip=null", "train.num_threads=null"]))
    assert r.train.grad_clip is None and r.train.num_threads is None
    err = config_error(apply_overrides(quickstart(), ["train.max_steps=null"]))
    assert err.problems == ["train.max_steps: expected int, got NoneType None"]


def test_bad_override_syntax_is_reported_all_at_once():
    bad = ["train.max_steps", "=3", "train..lr=1", ".lr=1", "train.=1"]
    with pytest.raises(ConfigError) as info:
        apply_overrides(quickstart(), ["seed=1", *bad])
    err = info.value
    assert err.source == "command-line overrides" and len(err.problems) == len(bad)
    for item in bad:
        assert repr(item) in str(err)


@pytest.mark.parametrize("item", ["peft.targets=[q_proj", "train.lr={", "output_dir=2024-02-30"])
def test_override_values_that_are_not_yaml(item):
    with pytest.raises(ConfigError, match="value is not valid YAML; quote it"):
        apply_overrides({}, [item])


def test_python_tag_in_an_override_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    with pytest.raises(ConfigError):
        apply_overrides({}, [f"output_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_load_recipe_applies_overrides_then_checks_them():
    r = load_recipe(QUICKSTART, ["train.max_steps=2", "model.from_config.num_hidden_layers=1"])
    assert r.train.max_steps == 2 and r.model.from_config["num_hidden_layers"] == 1
    with pytest.raises(ConfigError) as info:
        load_recipe(QUICKSTART, ["train.max_stepz=2", "peft.r=0", "data.max_len=big"])
    assert sorted(p.split(":")[0] for p in info.value.problems) == ["data.max_len", "peft.r", "train.max_stepz"]
    assert info.value.source == str(QUICKSTART)


# --- property: anything in, a Recipe or a ConfigError out ---------------------------------------

def _schema_paths() -> list[tuple[str, ...]]:
    """Every key path of the schema: ("seed",), ("train", "lr"), ..."""
    paths = []
    for name, tp in typing.get_type_hints(Recipe).items():
        paths += [(name, f.name) for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else [(name,)]
    return paths


PATHS = _schema_paths()
JUNK_KEYS = st.sampled_from(["", "x", "trian", "1", "model_type"]) | st.text(max_size=6)
KEYS = st.sampled_from(sorted({k for path in PATHS for k in path})) | JUNK_KEYS
# Values on the edges of the schema's types and checks, drawn as often as the plain ones.
EDGES = st.sampled_from([0, -1, 8, 64, 1.5, 2.0e-4, "2e-4", "10", "nan", math.inf, 10**400, "auto", "triton", "nf4",
                         "drop", "llama", "(", "a{99999999999}", "q_proj", ["q_proj"], {"model_type": "llama"}])
SCALARS = EDGES | st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                      max_leaves=25)
# Real paths twice as often as junk ones.
EDIT_PATHS = st.sampled_from(PATHS) | st.sampled_from(PATHS) | st.lists(KEYS, min_size=1, max_size=3).map(tuple)


@st.composite
def edited_quickstart(draw) -> dict:
    """The quickstart with a few keys (real or junk, at any depth) set to random values."""
    data = copy.deepcopy(QUICKSTART_DICT)
    for path, value in draw(st.lists(st.tuples(EDIT_PATHS, EDGES | EDGES | VALUES), min_size=1, max_size=6)):
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    return data


@settings(max_examples=200, deadline=None)
@given(edited_quickstart() | st.dictionaries(KEYS, VALUES, max_size=8))
def test_any_tree_gives_a_recipe_or_a_config_error(data):
    try:
        recipe = recipe_from_dict(data)
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)
    else:
        assert isinstance(recipe, Recipe)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=5))
def test_any_override_strings_give_a_dict_or_a_config_error(items):
    try:
        assert isinstance(apply_overrides({}, items), dict)
    except ConfigError as err:
        assert len(err.problems) <= len(items)


def test_data_sources_path_list_glob_or_mix_and_their_checks():
    recipe = recipe_from_dict(quickstart(data={"path": ["a.jsonl", "shards/*.jsonl"], "padding_free": False}))
    assert recipe.data.path == ["a.jsonl", "shards/*.jsonl"] and recipe.data.padding_free is False
    mixed = recipe_from_dict(quickstart(data={"path": None, "mix": [{"path": "a.jsonl", "weight": 3},
                                                                    {"path": ["b.jsonl"]}]}))
    assert [(m.path, m.weight) for m in mixed.data.mix] == [("a.jsonl", 3.0), (["b.jsonl"], 1.0)]
    text = str(config_error(quickstart(data={"mix": [{"path": "a.jsonl", "weight": 0}, {"weight": 1}],
                                             "num_proc": 0, "padding_free": "yes"})))
    assert "data.mix: set together with data.path" in text and "data.mix[0].weight: must be > 0" in text
    assert "data.mix[1].path: required" in text and "data.num_proc: must be > 0" in text
    assert "data.padding_free: expected 'auto' or bool" in text
    assert "data.path: required" in str(config_error(quickstart(data={"path": None})))
    streaming = str(config_error(quickstart(data={"streaming": True, "eval_split": 0.05})))
    assert "data.eval_split" in streaming and "data.eval_path" in streaming
    assert recipe_from_dict(quickstart(data={"streaming": True, "eval_split": 0})).data.streaming
