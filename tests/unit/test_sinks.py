"""logging.tensorboard / logging.wandb do what their keys say: the same numbers as metrics.jsonl."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from qtrain.config import load_recipe
from qtrain.config.schema import LoggingConfig
from qtrain.errors import ConfigError
from qtrain.train import sinks
from qtrain.train.run import train

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
        "model.from_config.num_key_value_heads=2", "model.dtype=float32", "train.micro_batch_size=2",
        "train.grad_accum=1", "data.max_len=64", "logging.every_steps=1", "logging.progress=false",
        "checkpoint.every_steps=0", "train.eval_every_steps=2"]


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_scalars_are_the_numbers_of_a_step_record():
    record = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 10.0, "skipped": "nonfinite",
              "eval_loss": 2.25}
    assert sinks.scalars(record) == {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.7,
                                     "train/tokens_per_s": 10.0, "eval/loss": 2.25}


def test_a_run_with_tensorboard_writes_what_metrics_jsonl_logs(tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(REPO / "configs/quickstart.yaml",
                         [f"output_dir={out}", *TINY, "train.max_steps=4", "logging.tensorboard=true"])
    summary = train(recipe)
    scalars = read_scalars(out / "tensorboard")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in rows} == pytest.approx(scalars["train/loss"], rel=1e-6)
    assert {r["step"]: r["lr"] for r in rows} == pytest.approx(scalars["train/lr"], rel=1e-6)
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [2, 4]
    assert scalars["eval/loss"][2] == pytest.approx(evals[2], rel=1e-6)
    assert scalars["eval/loss"][4] == pytest.approx(summary["final_eval_loss"], rel=1e-6)


def test_a_resumed_run_purges_the_steps_it_redoes(tmp_path):
    out = tmp_path / "tb"
    first = sinks.TensorBoardSink(out, resume_step=0)
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    first.close()
    second = sinks.TensorBoardSink(out, resume_step=1)  # resumed from step 1: steps 2.. are redone
    second.write({"step": 2, "loss": 20.0})
    second.close()
    assert read_scalars(out / sinks.TB_DIR)["train/loss"] == {1: 1.0, 2: 20.0}


class FakeRun:
    def __init__(self, **kwargs) -> None:
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return module


def test_wandb_is_offline_by_default_logs_each_record_and_keeps_its_run_id(tmp_path, fake_wandb):
    cfg = LoggingConfig(wandb=True)
    sink = sinks.WandbSink(cfg, tmp_path, {"seed": 0})
    sink.write({"step": 5, "loss": 1.5, "lr": 0.1})
    sink.close()
    run = fake_wandb.runs[0]
    assert run.init["mode"] == "offline" and run.init["project"] == "qtrain" and run.init["config"] == {"seed": 0}
    assert run.logged == [(5, {"train/loss": 1.5, "train/lr": 0.1})] and run.finished
    sinks.WandbSink(cfg, tmp_path, {})  # a resumed run continues the same W&B run
    assert fake_wandb.runs[1].init["id"] == run.init["id"] and fake_wandb.runs[1].init["resume"] == "allow"


def test_wandb_goes_online_only_when_configured(tmp_path, fake_wandb, monkeypatch):
    sinks.WandbSink(LoggingConfig(wandb=True, wandb_mode="online"), tmp_path, {})
    monkeypatch.setenv("WANDB_MODE", "online")
    sinks.WandbSink(LoggingConfig(wandb=True), tmp_path, {})
    assert [r.init["mode"] for r in fake_wandb.runs] == ["online", "online"]


@pytest.mark.parametrize("key,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_is_a_config_error_naming_the_key(monkeypatch, key, package):
    real = sinks.importlib.util.find_spec
    monkeypatch.setattr(sinks.importlib.util, "find_spec", lambda name: None if name == package else real(name))
    with pytest.raises(ConfigError, match=rf"logging.{key}: true needs the `{package}` package; `pip install {package}`"):
        sinks.check_available(LoggingConfig(**{key: True}))
