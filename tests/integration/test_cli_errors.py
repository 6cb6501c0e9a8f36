"""`qtrain train` on bad input, run as a user would: exit code 2, one `qtrain: ` message that names
the key/file/row and the fix, no traceback, and no output_dir left behind. One good run is the
control that shows the harness can tell success from failure.

Every case is the quickstart recipe shrunk by `TINY` plus the overrides that break it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TOKENIZER = REPO / "data" / "quickstart" / "tokenizer"
pytestmark = pytest.mark.slow
TINY = (
    "model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
    "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
    "model.from_config.num_key_value_heads=2", "train.max_steps=2",
)
# Subprocesses at once: each is mostly interpreter + torch import, so 3 overlap well on 2 cores.
WORKERS = 3


@dataclass
class Case:
    """One bad input: the recipe and overrides that carry it, and what the message must contain."""

    overrides: list[str]
    needles: list[str]
    recipe: Path = QUICKSTART
    # Fails while reading the recipe, before any library that prints warnings is imported,
    # so stderr must be exactly the message.
    config_stage: bool = False


class Run(NamedTuple):
    case: Case | None
    out_dir: Path
    proc: subprocess.CompletedProcess


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?\n", "response": f"It is {2 * i}."} for i in range(n)]


def malformed_yaml(tmp: Path) -> Case:
    bad = tmp / "broken.yaml"
    bad.write_text("output_dir: runs/x\ntrain: {max_steps: 2\nseed: 0\n", encoding="utf-8")
    return Case([], [str(bad), "malformed YAML at line"], recipe=bad, config_stage=True)


def missing_recipe(tmp: Path) -> Case:
    return Case([], ["recipe file not found", str(tmp / "nope.yaml")], recipe=tmp / "nope.yaml", config_stage=True)


def unknown_key(tmp: Path) -> Case:
    return Case(["train.max_stepz=2"], ["train.max_stepz: unknown key", "max_steps"], config_stage=True)


def wrong_type(tmp: Path) -> Case:
    return Case(["train.micro_batch_size=four"], ["train.micro_batch_size: expected int"], config_stage=True)


def rank_zero(tmp: Path) -> Case:
    return Case(["peft.r=0"], ["peft.r: must be > 0"], config_stage=True)


def kernels_triton(tmp: Path) -> Case:
    return Case(["kernels=triton"], ["kernels=triton", "kernels=torch"])


def missing_data(tmp: Path) -> Case:
    path = tmp / "missing.jsonl"
    return Case([f"data.path={path}"], [str(path), "not found", "data.path"])


def row_without_response(tmp: Path) -> Case:
    rows = _rows(6)
    del rows[2]["response"]
    path = _jsonl(tmp / "rows.jsonl", rows)
    return Case([f"data.path={path}"], [f"{path}, row 3", "'response'"])


def empty_data(tmp: Path) -> Case:
    path = tmp / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    return Case([f"data.path={path}"], [str(path), "empty", "data.path"])


def all_rows_too_long(tmp: Path) -> Case:
    path = _jsonl(tmp / "long.jsonl", [{"prompt": "word " * 20, "response": "word " * 20}] * 10)
    return Case([f"data.path={path}", "data.overlong=drop", "data.max_len=8"],
                [str(path), "no training sequences left", "data.max_len=8", "data.overlong"])


def targets_match_nothing(tmp: Path) -> Case:
    return Case(["peft.targets=[nope]"], ["peft.targets", "'nope'", "q_proj"])


def tokenizer_without_pad(tmp: Path) -> Case:
    from transformers import AutoTokenizer

    tok_dir = tmp / "tokenizer"
    shutil.copytree(TOKENIZER, tok_dir)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).is_file():
            cfg = json.loads((tok_dir / name).read_text())
            cfg.pop("pad_token", None)
            (tok_dir / name).write_text(json.dumps(cfg, indent=2))
    assert AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).pad_token is None
    return Case([f"model.tokenizer={tok_dir}"], ["model.tokenizer", str(tok_dir), "no pad token", "pad_token ="])


def fsdp_with_deepspeed_config(tmp: Path) -> Case:
    return Case(["distributed.engine=fsdp", "distributed.deepspeed_config=configs/deepspeed/zero3.json"],
                ["distributed.deepspeed_config: set, but distributed.engine is 'fsdp'"], config_stage=True)


def fsdp_with_paged_optimizer(tmp: Path) -> Case:
    return Case(["distributed.engine=fsdp", "train.optimizer=paged_adamw_8bit"],
                ["train.optimizer: 'paged_adamw_8bit' is not supported under distributed.engine: fsdp", "use adamw"],
                config_stage=True)


def zero3_json_requantizes_the_base(tmp: Path) -> Case:
    path = tmp / "zero3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "zero_quantized_nontrainable_weights": True}}))
    return Case(["distributed.engine=deepspeed", f"distributed.deepspeed_config={path}", "train.optimizer=adamw"],
                [str(path), "zero_optimization.zero_quantized_nontrainable_weights", "quant section", "remove it"])


CASES: dict[str, Callable[[Path], Case]] = {f.__name__: f for f in (
    malformed_yaml, missing_recipe, unknown_key, wrong_type, rank_zero, kernels_triton, missing_data,
    row_without_response, empty_data, all_rows_too_long, targets_match_nothing, tokenizer_without_pad,
    fsdp_with_deepspeed_config, fsdp_with_paged_optimizer, zero3_json_requantizes_the_base,
)}


def run_cli(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtrain", "train", str(recipe), *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _run_case(name: str, tmp: Path) -> Run:
    case, out = CASES[name](tmp), tmp / "run"
    return Run(case, out, run_cli(case.recipe, *TINY, f"output_dir={out}", *case.overrides))


def _good_run(tmp: Path) -> Run:
    return Run(None, tmp / "run", run_cli(QUICKSTART, *TINY, f"output_dir={tmp / 'run'}"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every case and the good run (under "good_run"), run once, several at a time."""
    with ThreadPoolExecutor(WORKERS) as pool:
        # Slowest first, so the pool does not end waiting on one long run.
        good = pool.submit(_good_run, tmp_path_factory.mktemp("good_run"))
        futures = {name: pool.submit(_run_case, name, tmp_path_factory.mktemp(name)) for name in reversed(CASES)}
        return {"good_run": good.result(), **{name: f.result() for name, f in futures.items()}}


def error_report(stderr: str) -> str:
    """The `qtrain: ...` message: one line, plus `  - ` lines when it lists several problems.

    Libraries may print warnings or progress bars before it (bitsandbytes on import, transformers
    while writing a base model); nothing may follow it.
    """
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("qtrain: ")]
    assert len(starts) == 1, stderr
    report = lines[starts[0]:]
    assert all(line.startswith("  - ") for line in report[1:]), stderr
    return "\n".join(report)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error_and_leaves_nothing(runs, name):
    case, out_dir, proc = runs[name]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    report = error_report(proc.stderr)
    if case.config_stage:
        assert proc.stderr == report + "\n"
    assert report.startswith(("qtrain: config error: ", "qtrain: data error: ")), report
    for needle in case.needles:
        assert needle in report
    assert not out_dir.exists(), sorted(str(p) for p in out_dir.rglob("*"))


def test_good_run_exits_zero_and_writes_the_adapter(runs):
    _, out_dir, proc = runs["good_run"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (out_dir / "summary.json").is_file()
