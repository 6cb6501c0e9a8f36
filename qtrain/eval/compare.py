"""`qtrain compare RECIPE`: base vs full fine-tuning vs LoRA vs QLoRA on the same data and budget.

Each trained variant is the recipe with a few keys changed (below), run as its own
`qtrain train` process, so its peak memory and time are its own; every variant shares one base
(the recipe's `model.path`, or one `from_config` base written once to `<output_dir>/base_model`).
Then each is evaluated in this process (`qtrain eval`'s code: eval loss and, for summarization
and instruction data, greedy generation + ROUGE), and `report.md`, `compare.json` and the plots
go to the recipe's `output_dir`:

    <output_dir>/{full,lora,qlora}/   each variant's training run (adapter/ or model/, metrics, summary)
    <output_dir>/{base,...}/          each variant's eval.json and eval_generations.jsonl
    <output_dir>/base_model/          the shared random-init base (with model.from_config)
    <output_dir>/data_cache/          the data, tokenized once for every variant
    <output_dir>/report.md, compare.json, loss_curves.png, rouge.png
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qtrain.config import load_recipe
from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError, TrainingStopped
from qtrain.eval.report import plot_loss_curves, plot_rouge, write_report

TRAINED = ("full", "lora", "qlora")


def variant_overrides(variant: str, recipe: Recipe) -> list[str]:
    """Recipe keys that make `variant` out of the user's recipe (applied after the user's overrides)."""
    if variant == "full":
        lr = recipe.compare.full_lr if recipe.compare.full_lr is not None else recipe.train.lr
        return ["peft.method=full", "quant.method=none", f"train.lr={lr}"]
    if variant == "lora":
        return ["peft.method=lora", "quant.method=none"]
    if variant == "qlora":
        return ["peft.method=lora", "quant.method=nf4"]
    return ["quant.method=none"]  # base: the 16-bit base as is


def shared_base(recipe: Recipe, out: Path) -> list[str]:
    """Point every variant at one base and one data cache: a `from_config` base is written once, and
    the data tokenized once, under the compare dir."""
    keys = [f"model.base_dir={out / 'base_model'}"] if recipe.model.from_config is not None else []
    return keys + ([f"data.cache_dir={out / 'data_cache'}"] if recipe.data.cache_dir is None else [])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train_variant(recipe_path: str, overrides: list[str], variant: str, recipe: Recipe, out: Path) -> dict[str, Any]:
    """Run `qtrain train` for one variant in a child process; returns what its summary and files say."""
    run_dir = out / variant
    cmd = [sys.executable, "-m", "qtrain", "train", recipe_path, *overrides, *shared_base(recipe, out),
           *variant_overrides(variant, recipe), f"output_dir={run_dir}", "checkpoint.resume=never"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    seconds = time.perf_counter() - t0
    if proc.returncode == 2:
        raise ConfigError(f"compare: training the {variant!r} variant failed with a user error (message above); "
                          f"its keys: {' '.join(variant_overrides(variant, recipe))}")
    if proc.returncode != 0:
        raise TrainingStopped(f"compare: training the {variant!r} variant stopped with exit code {proc.returncode} "
                              f"(see its output above); its run dir is {run_dir}", proc.returncode)
    summary = json.loads((run_dir / "summary.json").read_text())
    artifact = run_dir / ("model" if variant == "full" else "adapter")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"variant": variant, "run_dir": str(run_dir), "artifact": str(artifact),
            "artifact_bytes": dir_bytes(artifact), "train_seconds": round(seconds, 2),
            "curve": [(m["step"], m["loss"]) for m in metrics if not m.get("skipped")],
            **{k: summary[k] for k in ("trainable_params", "total_params", "peak_memory_mib", "median_step_s",
                                       "tokens_per_s", "final_train_loss", "steps", "device")}}


def eval_variant(recipe_path: str, overrides: list[str], variant: str, recipe: Recipe, out: Path) -> dict[str, Any]:
    from qtrain.eval.run import EvalOptions, evaluate_recipe
    from qtrain.infer.sampling import SamplingConfig

    r = load_recipe(recipe_path, [*overrides, *shared_base(recipe, out), *variant_overrides(variant, recipe),
                                  f"output_dir={out / variant}"])
    # full: the run's model/ dir; lora/qlora: the run's adapter/ over the shared base; base: no adapter.
    opts = EvalOptions(no_adapter=variant == "base", out_dir=str(out / variant),
                       max_gen_rows=recipe.compare.max_gen_rows,
                       sampling=SamplingConfig(max_new_tokens=recipe.compare.max_new_tokens))
    report = evaluate_recipe(r, opts, recipe_path)
    return {"eval_loss": report["eval_loss"], "perplexity": report["perplexity"], "rouge": report["rouge"],
            "generated_rows": (report["generation"] or {}).get("rows", 0)}


def compare(recipe_path: str, overrides: list[str]) -> Path:
    """Train and evaluate every variant of `recipe.compare.variants`; returns the path of report.md."""
    recipe = load_recipe(recipe_path, overrides)
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = recipe.compare.variants
    results: dict[str, dict[str, Any]] = {v: {"variant": v} for v in variants}
    trained = [v for v in variants if v in TRAINED]
    for i, variant in enumerate(trained, start=1):
        _say(f"compare: [{i}/{len(trained)}] training {variant}")
        results[variant].update(train_variant(recipe_path, overrides, variant, recipe, out))
    for i, variant in enumerate(variants, start=1):
        _say(f"compare: [{i}/{len(variants)}] evaluating {variant}")
        results[variant].update(eval_variant(recipe_path, overrides, variant, recipe, out))
    ordered = [results[v] for v in variants]
    plots = [plot_loss_curves({v: results[v].get("curve", []) for v in trained}, out / "loss_curves.png"),
             plot_rouge(ordered, out / "rouge.png")]
    t = recipe.train
    context = {"recipe": recipe_path, "overrides": overrides, "data": recipe.data.path, "steps": t.max_steps,
               "global_batch": t.micro_batch_size * t.grad_accum, "seed": recipe.seed,
               "base": recipe.model.path or f"{out / 'base_model'} (random init from model.from_config, seed {recipe.seed})",
               "device": next((r["device"] for r in ordered if r.get("device")), "cpu"),
               "gen_rows": max((r.get("generated_rows", 0) for r in ordered), default=0)}
    return write_report(out, ordered, context, [p for p in plots if p is not None])
