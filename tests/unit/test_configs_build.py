"""Every shipped recipe parses, and builds and trains one step at tiny size (litgpt's habit)."""

import json
from pathlib import Path

import pytest

from qtrain.config import load_recipe
from qtrain.distributed.env import DistEnv
from qtrain.train.loop import train_step
from qtrain.train.setup import prepare

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
COMMON = ["model.path=null", f"model.tokenizer={REPO / 'data/quickstart/tokenizer'}", "data.max_len=192",
          "train.micro_batch_size=2", "train.grad_accum=1", "train.max_steps=1"]
# A recipe's own architecture at tiny size: T5 recipes stay T5, everything else becomes a tiny Llama.
TINY = {
    "llama": ["model.from_config.model_type=llama", "model.from_config.hidden_size=64",
              "model.from_config.intermediate_size=160", "model.from_config.num_hidden_layers=1",
              "model.from_config.num_attention_heads=4", "model.from_config.num_key_value_heads=2"],
    "t5": ["model.from_config.d_model=64", "model.from_config.d_ff=128", "model.from_config.d_kv=16",
           "model.from_config.num_heads=4", "model.from_config.num_layers=1",
           "model.from_config.num_decoder_layers=1"],
}


def test_the_configs_dir_is_not_empty():
    assert len(CONFIGS) >= 3, CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_as_shipped(path):
    recipe = load_recipe(path)
    assert recipe.output_dir and recipe.train.max_steps > 0


def _data_for(fmt: str, tmp_path: Path) -> Path:
    if fmt == "instruction":
        return REPO / "data/quickstart/train.jsonl"
    if fmt in ("text", "chat"):
        return REPO / f"data/quickstart/{fmt}.jsonl"
    rows = [{"dialogue": f"#A#: I will bring {i} apples.\n#B#: Thanks!", "summary": f"A brings {i} apples."}
            for i in range(20)]
    out = tmp_path / "summ.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_and_steps_at_tiny_size(path, tmp_path):
    shipped = load_recipe(path)
    arch = "t5" if (shipped.model.from_config or {}).get("model_type") == "t5" else "llama"
    overrides = COMMON + TINY[arch] + [f"output_dir={tmp_path / 'run'}",
                                       f"data.path={_data_for(shipped.data.format, tmp_path)}"]
    recipe = load_recipe(path, overrides)
    session = prepare(recipe, DistEnv())
    before = {n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
    result = train_step(session, [[session.data.train[0], session.data.train[1]]])
    assert result.loss > 0 and result.grad_norm > 0
    changed = [n for n, p in session.model.named_parameters() if p.requires_grad and not p.equal(before[n])]
    assert changed  # the optimizer really stepped the adapter
