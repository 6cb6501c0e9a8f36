"""`qtrain compare RECIPE`: the untouched base and any list of fine-tuning methods on one recipe.

`compare.variants` names `base` and methods (`lora`, `ia3`, `prompt_tuning`, ...), each on the
recipe's base or on a chosen one (`lora@nf4`, `lora@none`; `qlora` = `lora@nf4`). Each trained
variant is the recipe with its method and base set and the `peft:` keys that method does not read
left out (so one recipe serves every method), written to `<out>/<variant>/recipe.yaml` and run as
its own `qtrain train` process, so its peak memory and time are its own. Every variant shares one
base (the recipe's `model.path`, or one `from_config` base written once to `<out>/base_model`).
Then each is evaluated in this process (`qtrain eval`'s code: eval loss and, for summarization
and instruction data, greedy generation + ROUGE), and `report.md`, `compare.json` and the plots
go to the recipe's `output_dir`:

    <output_dir>/<variant>/       its recipe.yaml, training run (adapter/ or model/, metrics, summary), eval.json
    <output_dir>/base/            the base variant's eval.json and eval_generations.jsonl
    <output_dir>/base_model/      the shared random-init base (with model.from_config)
    <output_dir>/data_cache/      the data, tokenized once for every variant
    <output_dir>/report.md, compare.json, loss_curves.png, rouge.png, rouge_vs_trainable.png
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qtrain.config import recipe_from_dict
from qtrain.config.load import apply_overrides, read_yaml
from qtrain.config.methods import METHOD_RULES
from qtrain.config.peft_checks import split_variant
from qtrain.config.schema import Recipe
from qtrain.errors import ConfigError, TrainingStopped
from qtrain.peft.registry import method_for
from qtrain.eval.report import plot_loss_curves, plot_rouge, plot_rouge_vs_trainable, write_report


def variant_settings(variant: str, recipe: Recipe) -> dict[str, Any]:
    """The method, base quantization and learning rate a variant trains with (base: no method)."""
    method, quant = split_variant(variant)
    if method == "base":
        return {"quant.method": "none"}
    if quant is None:
        quant = "none" if METHOD_RULES[method].unquantized_base else recipe.quant.method
    return {"peft.method": method, "quant.method": quant,
            "train.lr": recipe.compare.learning_rate(method, recipe.train.lr)}


def variant_dir(variant: str) -> str:
    return variant.replace("@", "-")


def shared_base(recipe: Recipe, out: Path) -> dict[str, Any]:
    """Point every variant at one base and one data cache: a `from_config` base is written once, and
    the data tokenized once, under the compare dir."""
    keys = {"model.base_dir": str(out / "base_model")} if recipe.model.from_config is not None else {}
    return {**keys, **({"data.cache_dir": str(out / "data_cache")} if recipe.data.cache_dir is None else {})}


def variant_data(raw: dict, variant: str, recipe: Recipe, out: Path) -> dict:
    """The recipe dict of one variant: the user's, with its method's settings and only the peft keys it reads."""
    data = copy.deepcopy(raw)
    settings = variant_settings(variant, recipe)
    method = settings.get("peft.method")
    peft = data.get("peft") if isinstance(data.get("peft"), dict) else {}
    data["peft"] = {k: v for k, v in peft.items() if method and k in METHOD_RULES[method].keys}
    overrides = {**settings, **shared_base(recipe, out), "output_dir": str(out / variant_dir(variant)),
                 "checkpoint.resume": "never"}
    return apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def own_keys(raw: dict) -> dict:
    """The recipe with only the peft keys its own method reads: a compare recipe configures every method
    it may compare, and each variant (validated on its own) takes its method's keys."""
    data = copy.deepcopy(raw)
    peft = data.get("peft") if isinstance(data.get("peft"), dict) else {}
    method = peft.get("method", "lora")
    keep = METHOD_RULES[method].keys if method in METHOD_RULES else set(peft)
    data["peft"] = {k: v for k, v in peft.items() if k == "method" or k in keep}
    return data


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train_variant(data: dict, variant: str) -> dict[str, Any]:
    """Run `qtrain train` for one variant in a child process; returns what its summary and files say."""
    recipe = recipe_from_dict(data, f"compare variant {variant}")
    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = run_dir / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(data, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qtrain", "train", str(recipe_file)])
    seconds = time.perf_counter() - t0
    if proc.returncode == 2:
        raise ConfigError(f"compare: training the {variant!r} variant failed with a user error (message above); "
                          f"its recipe: {recipe_file}")
    if proc.returncode != 0:
        raise TrainingStopped(f"compare: training the {variant!r} variant stopped with exit code {proc.returncode} "
                              f"(see its output above); its run dir is {run_dir}", proc.returncode)
    summary = json.loads((run_dir / "summary.json").read_text())
    artifact = run_dir / method_for(recipe.peft).artifact_dir
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"variant": variant, "method": recipe.peft.method, "run_dir": str(run_dir), "artifact": str(artifact),
            "artifact_bytes": dir_bytes(artifact), "train_seconds": round(seconds, 2),
            "curve": [(m["step"], m["loss"]) for m in metrics if not m.get("skipped")],
            **{k: summary[k] for k in ("trainable_params", "total_params", "peak_memory_mib", "median_step_s",
                                       "tokens_per_s", "final_train_loss", "steps", "device")}}


def eval_variant(data: dict, variant: str, recipe: Recipe, recipe_path: str) -> dict[str, Any]:
    from qtrain.eval.run import EvalOptions, evaluate_recipe
    from qtrain.infer.sampling import SamplingConfig

    r = recipe_from_dict(data, f"compare variant {variant}")
    # A method's run is evaluated with its own artifact (adapter/ over the shared base, or model/); base: none.
    opts = EvalOptions(no_adapter=variant == "base", out_dir=r.output_dir, max_gen_rows=recipe.compare.max_gen_rows,
                       sampling=SamplingConfig(max_new_tokens=recipe.compare.max_new_tokens))
    report = evaluate_recipe(r, opts, recipe_path)
    return {"eval_loss": report["eval_loss"], "perplexity": report["perplexity"], "rouge": report["rouge"],
            "generated_rows": (report["generation"] or {}).get("rows", 0)}


def compare(recipe_path: str, overrides: list[str]) -> Path:
    """Train and evaluate every variant of `recipe.compare.variants`; returns the path of report.md."""
    raw = apply_overrides(read_yaml(recipe_path), list(overrides))
    recipe = recipe_from_dict(own_keys(raw), recipe_path)
    out = Path(recipe.output_dir)
    variants = recipe.compare.variants
    plans = {v: variant_data(raw, v, recipe, out) for v in variants}
    for v, data in plans.items():  # every variant's recipe is valid before anything trains
        recipe_from_dict(copy.deepcopy(data), f"compare variant {v}")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {v: {"variant": v} for v in variants}
    trained = [v for v in variants if v != "base"]
    for i, variant in enumerate(trained, start=1):
        _say(f"compare: [{i}/{len(trained)}] training {variant}")
        results[variant].update(train_variant(plans[variant], variant))
    for i, variant in enumerate(variants, start=1):
        _say(f"compare: [{i}/{len(variants)}] evaluating {variant}")
        results[variant].update(eval_variant(plans[variant], variant, recipe, recipe_path))
    ordered = [results[v] for v in variants]
    plots = [plot_loss_curves({v: results[v].get("curve", []) for v in trained}, out / "loss_curves.png"),
             plot_rouge(ordered, out / "rouge.png"),
             plot_rouge_vs_trainable(ordered, out / "rouge_vs_trainable.png")]
    t = recipe.train
    context = {"recipe": recipe_path, "overrides": overrides, "data": recipe.data.path, "steps": t.max_steps,
               "global_batch": t.micro_batch_size * t.grad_accum, "seed": recipe.seed,
               "base": recipe.model.path or f"{out / 'base_model'} (random init from model.from_config, seed {recipe.seed})",
               "device": next((r["device"] for r in ordered if r.get("device")), "cpu"),
               "gen_rows": max((r.get("generated_rows", 0) for r in ordered), default=0)}
    return write_report(out, ordered, context, [p for p in plots if p is not None])
