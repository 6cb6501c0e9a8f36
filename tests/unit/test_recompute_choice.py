"""`train.recompute: auto`: the fastest mode whose planned extra memory fits in the given share of
what `full` leaves free; `full` when memory or the model's plan is unknown; what a session and the
plan report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qtrain.config import load_recipe
from qtrain.distributed.env import DistEnv
from qtrain.errors import ConfigError
from qtrain.peft.inject import lora_modules
from qtrain.peft.recompute import keeps_output
from qtrain.plan import Target, estimate, plan_recipe
from qtrain.plan.planner import check_recompute, resolve_recompute
from qtrain.plan.recompute_choice import FASTEST_FIRST, HEADROOM_SHARE, SELECTIVE_IMPOSSIBLE, choose_recompute
from qtrain.plan.settings import settings_from_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
LLAMA_8B = REPO / "configs" / "models" / "llama-3-8b"
GIB = 2**30
EIGHT_B_4K = [f"model.path={LLAMA_8B}", "model.from_config=null", "data.max_len=4096", "train.micro_batch_size=1"]


def _settings(*overrides: str):
    recipe = load_recipe(QUICKSTART, ["train.gradient_checkpointing=true", *overrides])
    return settings_from_recipe(recipe, Target("cuda", 1))


def _needed(s, mode: str) -> int:
    return estimate(dataclasses.replace(s, recompute=mode)).needed


def test_modes_keep_more_the_faster_they_are():
    s = _settings(*EIGHT_B_4K)
    needed = [_needed(s, m) for m in FASTEST_FIRST]
    assert needed == sorted(needed, reverse=True) and len(set(needed)) == len(needed), needed


@pytest.mark.parametrize("target", FASTEST_FIRST[:-1])
def test_auto_takes_the_fastest_mode_whose_extra_fits_in_the_headroom_share(target):
    s = _settings(*EIGHT_B_4K)
    full = _needed(s, "full")
    extra = {m: _needed(s, m) - full for m in FASTEST_FIRST}
    available = full + int(extra[target] / HEADROOM_SHARE)  # the budget is exactly `target`'s extra
    choice = choose_recompute(s, available)
    assert choice.mode == target, choice
    assert f"{extra[target] / 2**20:,.0f} MiB" in choice.reason
    # one byte less and `target` no longer fits: the next slower mode that does
    below = choose_recompute(s, available - 4)
    slower = FASTEST_FIRST[FASTEST_FIRST.index(target) + 1:]
    assert below.mode == next(m for m in slower if extra[m] <= HEADROOM_SHARE * (available - 4 - full))


def test_auto_is_full_when_nothing_else_fits_or_memory_is_unknown():
    s = _settings(*EIGHT_B_4K)
    full = _needed(s, "full")
    assert choose_recompute(s, full).mode == "full"          # no headroom at all
    assert choose_recompute(s, full // 2).mode == "full"     # does not fit even with full
    assert choose_recompute(s, None).mode == "full"
    assert "unknown" in choose_recompute(s, None).reason
    # a 4k-token Llama-3-8B step on a 24 GiB card: attention's projections fit, the MLP's do not
    assert choose_recompute(s, 24 * GIB).mode == "attention"
    assert choose_recompute(s, 80 * GIB).mode == "matmuls"


def test_resolve_recompute_keeps_an_explicit_mode_and_reports_checkpointing_off(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path}", "train.gradient_checkpointing=true",
                                      "train.recompute=mlp"])
    assert resolve_recompute(recipe, LLAMA_8B, "cpu", 1).mode == "mlp"  # 1 byte free: still what was asked
    off = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, gradient_checkpointing=False))
    assert resolve_recompute(off, LLAMA_8B, "cpu", 10**12).mode is None
    auto = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, recompute="auto"))
    assert resolve_recompute(auto, LLAMA_8B, "cpu", 1).mode == "full"
    assert resolve_recompute(auto, LLAMA_8B, "cpu", 10**13).mode == "matmuls"


def test_qtrain_plan_resolves_auto_against_the_target_and_says_so():
    recipe = load_recipe(QUICKSTART, [*EIGHT_B_4K, "train.gradient_checkpointing=true"])
    small, large = (plan_recipe(recipe, Target("cuda", 1, gib * GIB)) for gib in (24, 80))
    assert (small.settings.recompute, large.settings.recompute) == ("attention", "matmuls")
    assert any(n.startswith("train.recompute: attention (auto:") for n in small.notes)
    assert plan_recipe(recipe, Target("cuda", 1, None)).settings.recompute == "full"


def test_a_session_uses_and_reports_the_mode_auto_chose(tmp_path):
    from qtrain.train.setup import prepare

    recipe = load_recipe(QUICKSTART, [f"output_dir={tmp_path / 'run'}", "train.gradient_checkpointing=true",
                                      "model.dtype=float32", "logging.progress=false", "train.num_threads=1"])
    s = prepare(recipe, DistEnv())
    assert s.recompute.mode in FASTEST_FIRST and s.recompute.reason.startswith("auto:")
    kept = {n: m.keep_output for n, m in lora_modules(s.model).items()}
    assert kept and kept == {n: keeps_output(s.recompute.mode, n.rsplit(".", 1)[-1], unneeded=("down_proj",))
                             for n in kept}
    # a quickstart step keeps a few MiB more at most: with any test machine's free memory, the fastest mode
    assert s.recompute.mode == "matmuls"


def test_auto_recomputes_whole_layers_under_zero3_but_not_under_fsdp():
    recipe = load_recipe(QUICKSTART, [*EIGHT_B_4K, "train.gradient_checkpointing=true"])
    s = settings_from_recipe(recipe, Target("cuda", 2), "zero3")
    choice = choose_recompute(s, 10**13)
    assert choice.mode == "full" and choice.reason == f"auto: {SELECTIVE_IMPOSSIBLE['zero3']}"
    assert plan_recipe(recipe, Target("cuda", 2, 80 * GIB), "zero3").settings.recompute == "full"
    assert plan_recipe(recipe, Target("cuda", 2, 80 * GIB), "fsdp").settings.recompute == "matmuls"


def test_a_selective_mode_under_zero3_is_refused_before_any_work(tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    ds = ["distributed.engine=deepspeed", f"distributed.deepspeed_config={zero3}", "train.gradient_checkpointing=true"]
    for mode in ("mlp", "attention", "matmuls"):
        recipe = load_recipe(QUICKSTART, [*ds, f"train.recompute={mode}"])
        with pytest.raises(ConfigError, match=f"train.recompute: {mode} cannot run under zero3.*train.recompute: full"):
            check_recompute(recipe, 2)
        assert any("a run refuses it" in n for n in plan_recipe(recipe, Target("cuda", 2)).notes)
    for mode in ("auto", "full"):
        check_recompute(load_recipe(QUICKSTART, [*ds, f"train.recompute={mode}"]), 2)
    check_recompute(load_recipe(QUICKSTART, ["distributed.engine=fsdp", "train.gradient_checkpointing=true",
                                             "train.recompute=mlp"]), 2)  # runs under FSDP2; auto just avoids it
