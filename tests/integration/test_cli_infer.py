"""`qtrain generate|merge|eval` end to end on a tiny trained adapter, run as a user would.

The adapter is trained once (5 steps of the shrunk quickstart, in process); the commands then run
as subprocesses, several at a time. Bad input goes through `qtrain.cli.main` in process (each
subprocess costs ~5 s of imports): exit 2, one `qtrain: ` message, no traceback.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qtrain.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
pytestmark = pytest.mark.slow
TINY = [
    "model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
    "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
    "model.from_config.num_key_value_heads=2", f"model.tokenizer={REPO / 'data/quickstart/tokenizer'}",
    f"data.path={REPO / 'data/quickstart/train.jsonl'}", "logging.progress=false",
]
WORKERS = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from qtrain.config import load_recipe
    from qtrain.train.run import train

    out = tmp_path_factory.mktemp("infer") / "run"
    train(load_recipe(QUICKSTART, TINY + [f"output_dir={out}", "train.max_steps=5", "checkpoint.every_steps=3"]))
    assert (out / "adapter").is_dir()
    return out


def _snapshot_adapter(run_dir: Path) -> Path:
    """The adapter of the step-3 snapshot, wherever the checkpoint layout keeps it."""
    found = sorted((run_dir / "checkpoints").rglob("adapter_config.json"))
    assert found, "training wrote no snapshot adapter"
    return found[0].parent


def _qtrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtrain", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(run_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    adapter, step3 = run_dir / "adapter", _snapshot_adapter(run_dir)
    prompts = tmp / "in.jsonl"
    prompts.write_text('{"prompt": "Add 5 and 46.\\n"}\n{"prompt": "Spell out 63.\\n", "adapter": null}\n'
                       '{"prompt": "What does a fummo eat?\\n", "adapter": "early"}\n', encoding="utf-8")
    jobs = {
        "prompt": ["generate", "--adapter", adapter, "--prompt", "Add 5 and 46.\n", "--max-new-tokens", "8"],
        "input": ["generate", "--adapter", f"final={adapter}", "--adapter", f"early={step3}", "--input", prompts,
                  "--output", tmp / "out.jsonl", "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9"],
        "merge": ["merge", "--adapter", adapter, "--out", tmp / "merged", "--dtype", "bf16"],
        # options before and after the overrides: both are accepted
        "eval": ["eval", QUICKSTART, "--out-dir", tmp / "eval", *TINY, f"output_dir={run_dir}",
                 "--max-gen-rows", "4", "--max-new-tokens", "4"],
    }
    with ThreadPoolExecutor(WORKERS) as pool:
        procs = dict(zip(jobs, pool.map(lambda a: _qtrain(*a), jobs.values())))
    procs["tmp"] = tmp
    return procs


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_generate_streams_a_single_prompt(runs):
    _ok(runs["prompt"])
    assert runs["prompt"].stdout.endswith("\n") and runs["prompt"].stdout.strip()
    assert "nf4 base from" in runs["prompt"].stderr


def test_generate_batches_a_file_with_per_row_adapters(runs):
    _ok(runs["input"])
    rows = [json.loads(line) for line in (runs["tmp"] / "out.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in rows] == ["final", None, "early"]
    assert all(set(r) == {"prompt", "completion", "adapter"} and isinstance(r["completion"], str) for r in rows)
    assert rows[0]["prompt"] == "Add 5 and 46.\n"


def test_merge_writes_a_bf16_model_transformers_loads(runs, run_dir):
    from transformers import AutoModelForCausalLM

    _ok(runs["merge"])
    assert "merged 7 layers" in runs["merge"].stdout
    model = AutoModelForCausalLM.from_pretrained(str(runs["tmp"] / "merged"), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 50, 60, 70]])).logits).all()


def test_eval_writes_eval_json(runs):
    _ok(runs["eval"])
    report = json.loads((runs["tmp"] / "eval" / "eval.json").read_text())
    assert report["perplexity"] == math.exp(report["eval_loss"]) and report["generation"]["rows"] == 4
    assert set(report["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert "perplexity" in runs["eval"].stdout


def _main(capsys, *args) -> str:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("qtrain: ") and "Traceback" not in err
    return err


def test_bad_inputs_are_exit_2_with_one_message(run_dir, tokenizer, tmp_path, capsys):
    from qtrain.models.build import write_random_base

    adapter = run_dir / "adapter"
    other = write_random_base({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2},
                              tokenizer, 0, torch.float32, tmp_path / "other")
    err = _main(capsys, "generate", "--adapter", adapter, "--base", other, "--prompt", "hi")
    assert "checkpoint error:" in err and "q_proj.lora_A.weight has shape (16, 64)" in err
    assert "adapter dir not found" in _main(capsys, "generate", "--adapter", tmp_path / "nope", "--prompt", "x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no rows" in _main(capsys, "generate", "--adapter", adapter, "--input", empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    err = _main(capsys, "generate", "--adapter", adapter, "--input", bad)
    assert f"{bad}, line 2: not valid JSON" in err
    assert "--use zz" in _main(capsys, "generate", "--adapter", adapter, "--use", "zz", "--prompt", "x")
    assert "refused" in _main(capsys, "merge", "--adapter", adapter, "--out", tmp_path / "m", "--dtype", "nf4")
    assert "adapter dir not found" in _main(capsys, "eval", QUICKSTART, *TINY, f"output_dir={tmp_path}")
