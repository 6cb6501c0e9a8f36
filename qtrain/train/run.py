"""`train(recipe)`: set up, resume if asked, loop, save the adapter (or full model), write summary.json."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

from qtrain.checkpoint.atomic import atomic_write_text
from qtrain.checkpoint.resume import find_resume_point
from qtrain.checkpoint.train_state import required_files, restore
from qtrain.config.schema import Recipe
from qtrain.data import BatchStream
from qtrain.distributed import deepspeed as ds
from qtrain.distributed.ddp import process_group
from qtrain.distributed.env import read_env
from qtrain.errors import EXIT_PREEMPTED, QtrainError, TrainingStopped
from qtrain.peft.method import ArtifactContext
from qtrain.peft.registry import method_for
from qtrain.train.checkpointing import checkpoint_optimizer
from qtrain.train.faults import FaultPlan
from qtrain.train.guard import catch_preemption
from qtrain.train.loop import RunState, evaluate, run_loop
from qtrain.train.metrics import MetricsLog, median_step_s, param_counts, peak_memory_mib, truncate_metrics
from qtrain.train.setup import DTYPES, Session, prepare


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
    trainable, total = param_counts(s.model)
    r = s.recipe
    what = method_for(r.peft).describe(r.peft, s.target_names)
    return (f"qtrain: {r.quant.method} base from {s.base_dir} on {s.device}; {what}; {trainable:,} trainable "
            f"of {total:,} params ({100 * trainable / total:.3f}%)\n{s.data.report.summary_line()}")


def artifact_dir(recipe: Recipe) -> Path:
    """What a finished run leaves to use: `adapter/` (the method's format), or `model/` after full fine-tuning."""
    return Path(recipe.output_dir) / method_for(recipe.peft).artifact_dir


def build_summary(s: Session, state: RunState) -> dict:
    trainable, total = param_counts(s.model)
    times, tokens = state.step_times[1:] or state.step_times, state.tokens[1:] or state.tokens
    mb, ga = s.recipe.train.micro_batch_size, s.recipe.train.grad_accum
    return {
        "steps": state.step,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100.0 * trainable / total, 4),
        "median_step_s": median_step_s(state.step_times),
        "tokens_per_s": sum(tokens) / sum(times) if times and sum(times) > 0 else None,
        "peak_memory_mib": round(peak_memory_mib(s.device), 1),
        "final_train_loss": state.last_loss,
        "final_eval_loss": state.last_eval_loss,
        "nonfinite_steps_skipped": state.nonfinite_total,
        "global_batch_size": mb * ga * s.env.world_size,
        "world_size": s.env.world_size,
        "device": str(s.device),
        "quant": s.recipe.quant.method,
        "method": s.recipe.peft.method,
        "lora_layers": len(s.target_names),
        "data": vars(s.data.report),
        **method_for(s.recipe.peft).report(s.model),
    }


def _closing(summary: dict, out: Path, artifact: Path) -> str:
    ev = summary["final_eval_loss"]
    ev_text = f", eval loss {ev:.4f}" if ev is not None else ""
    med, tps = summary["median_step_s"], summary["tokens_per_s"]
    speed = f"median step {med:.3f}s, {tps:.0f} tokens/s, " if med is not None and tps is not None else ""
    return (f"done: {summary['steps']} steps, final train loss {summary['final_train_loss']:.4f}{ev_text}; "
            f"{speed}peak memory {summary['peak_memory_mib']:.0f} MiB\n"
            f"{artifact.name}: {artifact}\nsummary: {out / 'summary.json'}")


def _resume(s: Session, ckpt: Path, stream: BatchStream, metrics: Path) -> RunState:
    ts = restore(ckpt, s.env.rank, model=s.model, optimizer=checkpoint_optimizer(s), method=s.recipe.peft.method)
    if s.engine is not None:
        ds.load_optimizer_shard(s.engine, ckpt, s.env.rank)
    s.scheduler.load_state_dict(ts["scheduler"])
    stream.load_state_dict(ts["data"])
    state = RunState.from_json(ts["run"])
    if s.env.is_main:
        truncate_metrics(metrics, state.step)
    _say(s, f"resumed from {ckpt} (step {state.step})")
    return state


def train(recipe: Recipe) -> dict:
    """Run `recipe` to completion (or to a checkpointed stop); returns the summary also written to summary.json."""
    out = Path(recipe.output_dir)
    env = read_env()
    faults = FaultPlan(env.rank)
    with catch_preemption() as flag, process_group(env, recipe.distributed.timeout_s):
        with fresh_output_dir(out):
            s = prepare(recipe, env)
            required = required_files(env.world_size, recipe.peft.method) + (ds.shard_files(env.world_size) if s.engine else [])
            ckpt = find_resume_point(out, recipe.checkpoint.resume, required)
            out.mkdir(parents=True, exist_ok=True)
        _say(s, _header(s))
        t = recipe.train
        stream = BatchStream(len(s.data.train), t.micro_batch_size, recipe.seed, env.rank, env.world_size)
        metrics = out / "metrics.jsonl"
        if ckpt is not None:
            state = _resume(s, ckpt, stream, metrics)
        else:
            state = RunState()
            if env.is_main:
                metrics.unlink(missing_ok=True)
        if flag:
            raise TrainingStopped(f"preempted by signal {flag.signal} before the first step", EXIT_PREEMPTED)
        log = MetricsLog(metrics)
        try:
            state = run_loop(s, state, stream, log, flag, faults)
        finally:
            log.close()
        state.last_eval_loss = evaluate(s, flag)
    summary = build_summary(s, state)
    if env.is_main:
        if s.engine is not None:
            ds.check_adapter_whole(s.model)
        ctx = ArtifactContext(recipe.peft, str(s.base_dir.resolve()), s.tokenizer, DTYPES[recipe.model.dtype])
        method_for(recipe.peft).save_artifact(s.model, ctx, artifact_dir(recipe))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _say(s, _closing(summary, out, artifact_dir(recipe)))
    return summary
