"""Bad input never crashes: generated recipes and datasets either train or end in exit code 2.

Runs `qtrain.cli.main` in-process (imports paid once). Any exception escaping `main` is a crash:
hypothesis reports the input that caused it. A failing case must leave no output dir behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtrain.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
    "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=2",
    "model.from_config.num_key_value_heads=1", "train.max_steps=1", "train.micro_batch_size=2",
    "train.grad_accum=1", "data.max_len=64", "logging.progress=false", "checkpoint.every_steps=0",
]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_text = st.text(max_size=40)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), _text)
_value = st.recursive(_scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(_text, kids, max_size=3)), max_leaves=6)
_field = st.sampled_from(["prompt", "response", "text", "messages", "dialogue", "summary", "junk"])
_row = st.dictionaries(_field, st.one_of(_value, st.text(min_size=1, max_size=30)), max_size=4)


def _run(recipe: Path, out: Path, *extra: str) -> int:
    code = main(["train", str(recipe), f"output_dir={out}", *TINY, *extra])
    if code == 2:
        assert not out.exists(), "a failed run left its output dir behind"
    return code


def _write_rows(path: Path, rows: list, mode: str) -> None:
    if mode == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif mode == "bytes":
        path.write_bytes(b'{"prompt": "\xff\xfe bad", "response": "\xc3"}\n' * 3)
    elif mode == "huge":
        path.write_text(json.dumps({"prompt": "x " * 100_000, "response": "y"}) + "\n")
    else:
        path.write_text("")


@SETTINGS
@given(rows=st.lists(_row, max_size=6), mode=st.sampled_from(["jsonl", "jsonl", "jsonl", "bytes", "huge", "empty"]),
       fmt=st.sampled_from(["instruction", "text", "chat", "summarization"]))
def test_generated_datasets_train_or_fail_cleanly(rows, mode, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        _write_rows(data, rows, mode)
        code = _run(REPO / "configs" / "quickstart.yaml", tmp / "out", f"data.path={data}", f"data.format={fmt}",
                    f"model.tokenizer={REPO / 'data/quickstart/tokenizer'}")
        assert code in (0, 2)


_yaml_keys = st.sampled_from(["output_dir", "seed", "model", "quant", "peft", "data", "train", "kernels",
                              "checkpoint", "logging", "bogus", "r", "lr"])
_recipe_text = st.one_of(
    st.dictionaries(_yaml_keys, _value, max_size=5).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=200),
    st.sampled_from(["!!python/object/apply:os.system ['touch /tmp/qtrain_pwned']\n",
                     "model: !!python/name:os.system\n", "a: [1, 2\n", "- just\n- a list\n", "\x00\x01",
                     "train: {lr: .nan}\n", "peft: {r: -3}\n", "data: {max_len: 99999999999999999999}\n"]),
)


@SETTINGS
@given(text=_recipe_text)
def test_generated_recipe_texts_fail_cleanly(text):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8", errors="surrogateescape")
        assert _run(recipe, Path(tmp) / "out") in (0, 2)
    assert not Path("/tmp/qtrain_pwned").exists()


def test_a_valid_case_trains_so_the_harness_can_tell(tmp_path):
    out = tmp_path / "out"
    assert _run(REPO / "configs" / "quickstart.yaml", out) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    shutil.rmtree(out)
