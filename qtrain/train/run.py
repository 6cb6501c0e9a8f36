"""`train(recipe)`: set up, resume if asked, loop, save the adapter (or full model), write summary.json."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Iterator

from qtrain.checkpoint.atomic import atomic_write_text
from qtrain.checkpoint.lock import RunLock
from qtrain.checkpoint.resume import find_resume_point, warn
from qtrain.checkpoint.space import disk_full_stop, space_warning
from qtrain.checkpoint.train_state import read_trainer_state, restore
from qtrain.config.schema import Recipe
from qtrain.data.pipeline import ExampleStream
from qtrain.distributed.collectives import any_rank, process_group
from qtrain.distributed.env import DistEnv, read_env
from qtrain.errors import EXIT_PREEMPTED, ConfigError, QtrainError, TrainingStopped
from qtrain.peft.method import ArtifactContext
from qtrain.peft.registry import method_for
from qtrain.plan.planner import RunEstimate, run_estimate
from qtrain.train.checkpointing import checkpoint_optimizer, checkpoint_size_mib, newest_checkpoint_text
from qtrain.train.faults import FaultPlan
from qtrain.train.guard import catch_preemption
from qtrain.train.host_memory import host_cache_report
from qtrain.train.loop import RunState, evaluate, run_loop
from qtrain.train.metrics import median_step_s, param_counts, peak_memory_mib, truncate_metrics
from qtrain.train.sinks import Sinks, open_sinks
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


@contextlib.contextmanager
def output_dir_lock(out: Path, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds the output_dir's run lock for the whole run; every rank stops if it is taken."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(out).acquire()
        except ConfigError as exc:
            error = exc
    if any_rank(error is not None, env.device()):
        raise error or ConfigError(f"output_dir: {out} is in use by another qtrain run (see rank 0's message)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _say(s: Session, text: str) -> None:
    if s.env.is_main:
        print(text, flush=True)


def _header(s: Session, estimate: RunEstimate) -> str:
    trainable, total = param_counts(s.model, s.engine.numel)
    r = s.recipe
    what = method_for(r.peft).describe(r.peft, s.target_names)
    scaling = " with dynamic loss scaling" if s.scaler.enabled else ""
    host = f"host memory: {s.host_allocator.name} allocator ({s.host_allocator.reason})\n" if s.host_allocator else ""
    ckpt = f"recompute {s.recompute.mode} ({s.recompute.reason})" if s.recompute.mode else "off"
    return (f"qtrain: {r.quant.method} base from {s.base_dir} on {s.device}; {what}; {trainable:,} trainable "
            f"of {total:,} params ({100 * trainable / total:.3f}%)\n"
            f"precision: {s.precision.name} compute{scaling} ({s.precision.reason})\n"
            f"{host}"
            f"gradient checkpointing: {ckpt}\n"
            f"{s.data.header(r.train.micro_batch_size, s.data.flat)}\n"
            f"{estimate.line}")


def artifact_dir(recipe: Recipe) -> Path:
    """What a finished run leaves to use: `adapter/` (the method's format), or `model/` after full fine-tuning."""
    return Path(recipe.output_dir) / method_for(recipe.peft).artifact_dir


def build_summary(s: Session, state: RunState, estimate: RunEstimate) -> dict:
    trainable, total = param_counts(s.model, s.engine.numel)
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
        "planned_peak_memory_mib": estimate.peak_mib,
        "final_train_loss": state.last_loss,
        "final_eval_loss": state.last_eval_loss,
        "nonfinite_steps_skipped": state.nonfinite_total,
        "compute_dtype": s.precision.name,
        "compute_dtype_reason": s.precision.reason,
        "recompute": s.recompute.mode,
        "recompute_reason": s.recompute.reason,
        "autocast_dtype": None if s.autocast_dtype is None else str(s.autocast_dtype).replace("torch.", ""),
        "loss_scaling": s.scaler.enabled,
        "host_allocator": host_cache_report(s.host_allocator) if s.host_allocator else None,
        "loss_scale_overflows": state.loss_scale_overflows,
        "global_batch_size": mb * ga * s.env.world_size,
        "world_size": s.env.world_size,
        "engine": s.engine.name,
        # This rank's resident 4-bit base (from tensor storage): 1/N of it when the engine shards it.
        "nf4_bytes_per_rank": s.engine.nf4_bytes(s.model),
        "device": str(s.device),
        "quant": s.recipe.quant.method,
        "method": s.recipe.peft.method,
        "lora_layers": len(s.target_names),
        "data": vars(s.data.report),
        **method_for(s.recipe.peft).report(s.model),
    }


def _closing(summary: dict, out: Path, artifacts: dict[str, Path]) -> str:
    ev = summary["final_eval_loss"]
    ev_text = f", eval loss {ev:.4f}" if ev is not None else ""
    med, tps = summary["median_step_s"], summary["tokens_per_s"]
    speed = f"median step {med:.3f}s, {tps:.0f} tokens/s, " if med is not None and tps is not None else ""
    return (f"done: {summary['steps']} steps, final train loss {summary['final_train_loss']:.4f}{ev_text}; "
            f"{speed}peak memory {summary['peak_memory_mib']:.0f} MiB\n"
            + "".join(f"{name}: {path}\n" for name, path in artifacts.items() if Path(path).exists())
            + f"summary: {out / 'summary.json'}")


def artifact_mib(s: Session) -> float:
    """The final artifact's size: the trainable state in fp32, or for a method that leaves a whole model
    (full fine-tuning) every weight in the compute dtype."""
    trainable, total = param_counts(s.model, s.engine.numel)
    if method_for(s.recipe.peft).artifact_is_model:
        return total * s.precision.dtype.itemsize / 2**20
    return trainable * 4 / 2**20


def warn_if_space_short(s: Session) -> None:
    message = space_warning(Path(s.recipe.output_dir), s.recipe.checkpoint.keep, checkpoint_size_mib(s), artifact_mib(s))
    if message and s.env.is_main:
        warn(message)


def save_artifacts(s: Session, summary: dict) -> None:
    """The run's result (the method's artifact: an adapter, or a full model dir) and summary.json, each
    written atomically (rank 0, inside the engine's `whole_trainable`)."""
    recipe = s.recipe
    ctx = ArtifactContext(recipe.peft, str(s.base_dir.resolve()), s.tokenizer, s.precision.dtype)
    method_for(recipe.peft).save_artifact(s.model, ctx, artifact_dir(recipe))
    atomic_write_text(Path(recipe.output_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


def _resume(s: Session, ckpt: Path, stream: ExampleStream, metrics: Path) -> RunState:
    s.engine.check_resume(read_trainer_state(ckpt))
    with s.engine.whole_trainable(modify=True):
        ts = restore(ckpt, s.env.rank, model=s.model, optimizer=checkpoint_optimizer(s), method=s.recipe.peft.method)
    s.engine.load_state(ckpt)
    s.scheduler.load_state_dict(ts["scheduler"])
    s.scaler.load_state_dict(ts.get("scaler", {}))
    stream.load_state_dict(ts["data"])
    state = RunState.from_json(ts["run"])
    if s.env.is_main:
        truncate_metrics(metrics, state.step)
    _say(s, f"resumed from {ckpt} (step {state.step})")
    return state


def train(recipe: Recipe) -> dict:
    """Run `recipe` to completion (or to a checkpointed stop); returns the summary also written to summary.json."""
    with contextlib.ExitStack() as held:  # the output_dir lock, until the last artifact is written
        return _train(recipe, held)


def _train(recipe: Recipe, held: contextlib.ExitStack) -> dict:
    out = Path(recipe.output_dir)
    env = read_env()
    faults = FaultPlan(env.rank)
    with catch_preemption() as flag, process_group(env, recipe.distributed.timeout_s):
        with fresh_output_dir(out):
            held.enter_context(output_dir_lock(out, env))
            s = prepare(recipe, env)
            load_peak_mib = peak_memory_mib(s.device)  # loading and wrapping the model, before any step
            ckpt = find_resume_point(out, recipe.checkpoint.resume, s.engine.checkpoint_files(recipe.peft.method))
            out.mkdir(parents=True, exist_ok=True)
        estimate = run_estimate(recipe, s.base_dir, env.world_size, s.device.type,  # the plan this run checks
                                s.recompute.mode)
        _say(s, _header(s, estimate))
        warn_if_space_short(s)
        t = recipe.train
        stream = s.data.train_stream(t.micro_batch_size, recipe.seed, env.rank, env.world_size)
        metrics = out / "metrics.jsonl"
        if ckpt is not None:
            state = _resume(s, ckpt, stream, metrics)
        else:
            state = RunState()
            if env.is_main:
                metrics.unlink(missing_ok=True)
        if flag:
            raise TrainingStopped(f"preempted by signal {flag.signal} before the first step", EXIT_PREEMPTED)
        log = open_sinks(recipe.logging, out, metrics, state.step, dataclasses.asdict(recipe)) if env.is_main \
            else Sinks([])
        try:
            state = run_loop(s, state, stream, log, flag, faults)
            state.last_eval_loss = evaluate(s, flag)
            log.write_final_eval(state.step, state.last_eval_loss)
        finally:
            log.close()
        summary = {**build_summary(s, state, estimate), "peak_memory_load_mib": round(load_peak_mib, 1)}
        with s.engine.whole_trainable():  # every rank: a sharding engine gathers the adapter here
            if env.is_main:
                with disk_full_stop(f"the final {artifact_dir(recipe).name}/ and summary.json", out, artifact_mib(s),
                                    newest_checkpoint_text(out)):
                    save_artifacts(s, summary)
    _say(s, _closing(summary, out, {artifact_dir(recipe).name: artifact_dir(recipe), **log.paths(),
                                    "checkpoints": out / "checkpoints", "base model": s.base_dir}))
    return summary
