"""`qtrain compare`: four variants trained/evaluated on one recipe -> report.md, compare.json, PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_runs import REPO, clean_env
from qtrain.eval.report import label

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["model.from_config.hidden_size=64", "model.from_config.intermediate_size=160",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=4",
        "model.from_config.num_key_value_heads=2", "train.max_steps=4", "train.num_threads=1",
        "logging.every_steps=1", "logging.progress=false", "compare.max_gen_rows=3", "compare.max_new_tokens=6"]


def compare(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "qtrain", "compare", "configs/quickstart.yaml", f"output_dir={out}", *TINY, *extra]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "run"
    proc = compare(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    return out


def table(report: Path) -> list[list[str]]:
    lines = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # without the header


def test_report_has_one_row_per_variant_and_the_plots_are_pngs(compared):
    rows = table(compared / "report.md")
    assert [r[0] for r in rows] == [label(v) for v in ("base", "full", "lora@none", "lora@nf4")]
    for png in ("loss_curves.png", "rouge.png", "rouge_vs_trainable.png"):
        data = (compared / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, png
        assert f"![{png}]({png})" in (compared / "report.md").read_text()


def test_figures_are_the_runs_own(compared):
    results = {r["variant"]: r for r in json.loads((compared / "compare.json").read_text())["results"]}
    full, lora, qlora, base = results["full"], results["lora@none"], results["lora@nf4"], results["base"]
    for variant in ("full", "lora@none", "lora@nf4"):
        summary = json.loads((compared / variant.replace("@", "-") / "summary.json").read_text())
        assert results[variant]["peak_memory_mib"] == summary["peak_memory_mib"] > 0
        assert results[variant]["final_train_loss"] == summary["final_train_loss"]
        assert len(results[variant]["curve"]) == 4
    assert full["trainable_params"] == full["total_params"]
    assert lora["trainable_params"] == qlora["trainable_params"] < full["trainable_params"] / 5
    assert lora["artifact_bytes"] < full["artifact_bytes"]
    assert (compared / "full" / "model" / "config.json").is_file()
    for r in results.values():
        eval_json = json.loads((compared / r["variant"].replace("@", "-") / "eval.json").read_text())
        assert r["eval_loss"] == eval_json["eval_loss"] and r["rouge"] == eval_json["rouge"]
        assert set(r["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert base["eval_loss"] > full["eval_loss"]  # 4 steps of full fine-tuning already move the loss
    assert "trainable_params" not in base  # nothing trained


def test_shared_base_is_written_once(compared):
    assert (compared / "base_model" / "model.safetensors").is_file()
    assert not (compared / "base" / "model.safetensors").exists()  # the base variant's dir holds its eval only
    for variant in ("full", "lora-none", "lora-nf4"):
        assert not (compared / variant / "base").exists()
    adapter_cfg = json.loads((compared / "lora-none" / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == (compared / "base_model").resolve()
    # The data is tokenized once for all variants (training and eval share the cache).
    assert len((compared / "data_cache" / "builds.log").read_text().splitlines()) == 1


def test_bad_variant_is_a_config_error_before_any_work(tmp_path):
    proc = compare(tmp_path / "run", "compare.variants=[base, lora, lorra, ia3@nf8]")
    assert proc.returncode == 2
    assert "compare.variants: 'lorra' is not base or a method" in proc.stderr
    assert "compare.variants: 'ia3@nf8': the suffix must be @nf4 or @none" in proc.stderr
    assert not (tmp_path / "run").exists()
