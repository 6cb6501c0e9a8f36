"""`qtrain plan` as a user runs it: the table and JSON, suggestions that really fit, bad input -> exit 2."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from qtrain.cli import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
LLAMA8B = ["configs/llama3_8b_qlora.yaml", f"model.path={REPO / 'configs/models/llama-3-8b'}"]


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_8b_recipe_plan_adds_up_and_fits_a_24gib_gpu(capsys):
    out = plan_json(capsys, *LLAMA8B, "--gpu-mem", "24GiB")
    assert out["device"] == "cuda" and out["model"]["params"] > 8e9
    assert sum(c["mib"] for c in out["components"]) == pytest.approx(out["peak_mib"], abs=0.1 * len(out["components"]))
    assert out["needed_mib"] == pytest.approx(out["peak_mib"] + out["overhead_mib"], abs=0.1)
    assert out["fits"] is True and out["suggestions"] == []
    assert out["peak_mib"] == max(out["phases_mib"].values())


def test_what_the_knobs_change_moves_the_plan_the_right_way(capsys):
    base = plan_json(capsys, *LLAMA8B, "--gpu-mem", "80GiB")
    fused = plan_json(capsys, *LLAMA8B, "--gpu-mem", "80GiB", "kernels=triton")
    no_ckpt = plan_json(capsys, *LLAMA8B, "--gpu-mem", "80GiB", "train.gradient_checkpointing=false")
    sharded = plan_json(capsys, *LLAMA8B, "--gpu-mem", "80GiB", "--gpus", "8", "--engine", "fsdp")
    parts = {c["name"]: c["mib"] for c in base["components"]}
    assert fused["peak_mib"] < base["peak_mib"] and no_ckpt["peak_mib"] > base["peak_mib"]
    sharded_parts = {c["name"]: c["mib"] for c in sharded["components"]}
    assert sharded_parts["base_nf4"] == pytest.approx(parts["base_nf4"] / 8, rel=1e-3)
    assert sharded["engine_runnable"] is True  # engine fsdp runs the sharded base (qtrain.distributed.engine)


def test_suggestions_are_overrides_that_really_fit(capsys):
    roomy = plan_json(capsys, QUICKSTART, "--device", "cpu", "--gpu-mem", "64GiB")
    tight = roomy["overhead_mib"] + 0.6 * roomy["peak_mib"]  # the runtime and 60% of the tensors
    args = [QUICKSTART, "--device", "cpu", "--gpu-mem", f"{tight:.1f}MiB"]
    out = plan_json(capsys, *args)
    assert out["fits"] is False and out["suggestions"]
    for suggestion in out["suggestions"]:
        flags = [part for flag in suggestion["flags"] for part in shlex.split(flag)]
        again = plan_json(capsys, *args, *suggestion["overrides"], *flags)
        assert again["fits"] is True, suggestion
        assert again["needed_mib"] == pytest.approx(suggestion["needed_mib"], abs=0.1)


def test_the_table_names_the_peak_and_the_verdict(capsys):
    assert main(["plan", *LLAMA8B, "--gpu-mem", "8GiB"]) == 0
    text = capsys.readouterr().out
    assert "does not fit" in text and "nearest settings that fit" in text and "NF4" in text


@pytest.mark.parametrize("args,needle", [
    ([QUICKSTART, "--gpu-mem", "24 gigs"], "--gpu-mem: cannot read '24 gigs'"),
    ([QUICKSTART, "--gpus", "0"], "--gpus: must be >= 1"),
    ([QUICKSTART, "--gpus", "2", "--engine", "plain"], "--engine: 'plain' is single-process"),
    ([QUICKSTART, "train.micro_batch_size=zero"], "train.micro_batch_size"),
    ([QUICKSTART, "model.from_config={model_type: t5, d_model: 64, d_ff: 128, d_kv: 16, num_heads: 4, num_layers: 1}"],
     "encoder-decoder"),
    ([QUICKSTART, "peft.method=ia3"], "peft.method: 'ia3' is not in the memory model yet"),
])
def test_bad_input_is_one_message_and_exit_2(capsys, args, needle):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_a_recipe_that_does_not_parse_and_a_dir_without_config_json(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert main(["plan", str(bad)]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    assert main(["plan", QUICKSTART, f"model.path={tmp_path}", "model.from_config=null"]) == 2
    assert f"model.path: {tmp_path} has no config.json" in capsys.readouterr().err
