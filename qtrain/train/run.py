"""`train(recipe)`: set up, loop, save the adapter, write summary.json. The CLI and the API call this."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.checkpoint.atomic import atomic_write_text
from qtrain.config.schema import Recipe
from qtrain.data import BatchStream
from qtrain.distributed.env import read_env
from qtrain.errors import QtrainError
from qtrain.train.loop import RunState, build_summary, evaluate, run_loop
from qtrain.train.metrics import MetricsLog
from qtrain.train.setup import Session, prepare


@contextlib.contextmanager
def fresh_output_dir(path: Path) -> Iterator[None]:
    """If `path` did not exist and a user error escapes, remove it: bad input leaves nothing behind."""
    existed = path.exists()
    try:
        yield
    except QtrainError:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _say(s: Session, text: str) -> None:
    if s.env.is_main:
        print(text, flush=True)


def _header(s: Session) -> str:
    from qtrain.train.metrics import param_counts

    trainable, total = param_counts(s.model)
    r = s.recipe
    return (f"qtrain: {r.quant.method} base from {s.base_dir} on {s.device}; LoRA r={r.peft.r} on "
            f"{len(s.target_names)} layers; {trainable:,} trainable of {total:,} params "
            f"({100 * trainable / total:.3f}%)\n{s.data.report.summary_line()}")


def _closing(summary: dict, out: Path) -> str:
    ev = summary["final_eval_loss"]
    ev_text = f", eval loss {ev:.4f}" if ev is not None else ""
    med = summary["median_step_s"]
    return (f"done: {summary['steps']} steps, final train loss {summary['final_train_loss']:.4f}{ev_text}; "
            f"median step {med:.3f}s, {summary['tokens_per_s']:.0f} tokens/s, peak memory "
            f"{summary['peak_memory_mib']:.0f} MiB\nadapter: {out / 'adapter'}\nsummary: {out / 'summary.json'}")


def train(recipe: Recipe) -> dict:
    """Run `recipe` to completion; returns the summary that is also written to summary.json."""
    out = Path(recipe.output_dir)
    env = read_env()
    with fresh_output_dir(out):
        s = prepare(recipe, env)
        out.mkdir(parents=True, exist_ok=True)
    _say(s, _header(s))
    t = recipe.train
    stream = BatchStream(len(s.data.train), t.micro_batch_size, recipe.seed, env.rank, env.world_size)
    log = MetricsLog(out / "metrics.jsonl")
    try:
        state = run_loop(s, RunState(), stream, log)
    finally:
        log.close()
    state.last_eval_loss = evaluate(s)
    summary = build_summary(s, state)
    if env.is_main:
        save_adapter(s.model, recipe.peft, str(s.base_dir.resolve()), out / "adapter")
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _say(s, _closing(summary, out))
    return summary
