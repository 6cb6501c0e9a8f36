"""The training loop: accumulate, guard, step, log, evaluate, checkpoint."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from qtrain.data import Example, collate
from qtrain.data.pipeline import ExampleStream
from qtrain.errors import EXIT_NONFINITE, EXIT_PREEMPTED, TrainingStopped
from qtrain.models.arch import collate_start_id
from qtrain.peft.registry import method_for
from qtrain.train.checkpointing import save_checkpoint
from qtrain.train.faults import FaultPlan
from qtrain.train.guard import PreemptFlag
from qtrain.train.loss import batch_trained_tokens, is_seq2seq_batch, loss_sum, nll_sum
from qtrain.train.metrics import MetricsLog
from qtrain.train.progress import Progress
from qtrain.train.setup import Session


@dataclass
class RunState:
    """What the loop carries from step to step (and what a checkpoint restores)."""

    step: int = 0
    last_loss: float = math.nan
    last_eval_loss: float | None = None
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    loss_scale_overflows: int = 0
    step_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["step_times"], out["tokens"]  # timing of this process only
        return out

    @classmethod
    def from_json(cls, data: dict) -> RunState:
        return cls(**data)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    seconds: float
    skipped: bool
    # fp16 loss scaling: the gradients overflowed at the current scale (skipped; the scale backs off).
    overflow: bool = False


def _autocast(s: Session):
    if s.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=s.device.type, dtype=s.autocast_dtype)


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _collate(s: Session, examples) -> dict[str, torch.Tensor]:
    """A device batch of `examples` (decoder-only, or encoder-decoder pairs for a T5-family model)."""
    return _batch_to(collate(examples, s.tokenizer.pad_token_id, collate_start_id(s.model), flat=s.data.flat), s.device)


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens the model processed: the input's, plus an encoder-decoder's decoder targets.

    A padding-free batch has no attention mask: every position is a real token."""
    tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    if is_seq2seq_batch(batch):
        tokens += batch_trained_tokens(batch)
    return tokens


def loss_sum_of(s: Session, batch: dict[str, torch.Tensor], model=None) -> torch.Tensor:
    return loss_sum(s.model, batch, s.fused_ce_backend, lambda: _autocast(s), model)


def with_penalty(s: Session, objective: torch.Tensor) -> torch.Tensor:
    """Add the method's regularizer (diff pruning's L0 penalty) once per optimizer step: in the last
    micro-batch's backward, so the engine reduces it with the rest (each rank adds it; the average
    over ranks is the penalty once, as in one process). The logged loss stays the LM loss."""
    penalty = method_for(s.recipe.peft).penalty(s.model)
    return objective if penalty is None else objective + penalty


def train_step(s: Session, micro_batches: list[list[Example]], poison: bool = False,
               backward_factor: float = 1.0) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches; the loss is the mean over all their trained tokens.

    A non-finite loss or gradient norm skips `optimizer.step` (and the schedule): the adapter
    keeps its last good values; the caller applies the recipe's policy.
    """
    t0 = time.perf_counter()
    batches = [_collate(s, examples) for examples in micro_batches]
    local_trained = sum(batch_trained_tokens(b) for b in batches)
    (global_trained,) = s.engine.all_reduce_sum([float(local_trained)])
    n_trained = max(1.0, global_trained)
    # Every engine averages gradients over ranks; scaling by world size makes the result the gradient of
    # (sum of every rank's token losses) / (all ranks' trained tokens), exactly what one process
    # with the combined batch computes.
    scale = s.env.world_size / n_trained
    total = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with s.engine.accumulating(last=last):
            loss_sum = loss_sum_of(s, batch, s.forward_model)
            if poison:
                loss_sum = loss_sum * math.nan
            objective = with_penalty(s, loss_sum * scale) if last else loss_sum * scale
            s.engine.backward(objective * backward_factor, s.scaler)
        total += float(loss_sum.detach())
    (total,) = s.engine.all_reduce_sum([total])
    loss = total / n_trained
    # Unscale (fp16), clip and step; a non-finite loss or gradient norm on any rank skips the update
    # on every rank (under fp16 a finite loss with non-finite gradients is an overflow: the scale backs off).
    outcome = s.engine.step(loss_finite=math.isfinite(loss), scaler=s.scaler)
    grad_norm, finite = outcome.grad_norm, outcome.applied
    overflow = s.scaler.overflowed(math.isfinite(loss), math.isfinite(grad_norm))
    if finite:
        s.scheduler.step()
    tokens = sum(batch_tokens(b) for b in batches)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    return StepResult(loss, grad_norm, tokens, time.perf_counter() - t0, skipped=not finite, overflow=overflow)


@torch.no_grad()
def evaluate(s: Session, flag: PreemptFlag | None = None) -> float | None:
    """Mean NLL per trained token over the eval split (None without one, or if preempted meanwhile)."""
    examples = s.data.eval
    if not examples:
        return None
    mb = s.recipe.train.micro_batch_size
    chunks = [examples[i:i + mb] for i in range(0, len(examples), mb)]
    if s.recipe.train.eval_batches:
        chunks = chunks[: s.recipe.train.eval_batches]
    s.model.eval()
    try:
        result = nll_sum(chunks, lambda chunk: _collate(s, chunk), lambda batch: loss_sum_of(s, batch),
                         stop=lambda: bool(flag))
    finally:
        s.model.train()
    if result is None:
        return None
    total, count = result
    return total / max(1, count)


def _nonfinite(s: Session, state: RunState, result: StepResult) -> None:
    """Apply train.nonfinite: `skip` tolerates up to max_nonfinite_in_row in a row, `stop` none."""
    state.nonfinite_in_row += 1
    state.nonfinite_total += 1
    t = s.recipe.train
    limit = 1 if t.nonfinite == "stop" else t.max_nonfinite_in_row
    if state.nonfinite_in_row >= limit:
        raise TrainingStopped(
            f"non-finite loss/gradients at step {state.step} (loss {result.loss}, grad norm {result.grad_norm}; "
            f"{state.nonfinite_in_row} in a row); the last good state is saved", EXIT_NONFINITE)


def _skipped_step(s: Session, state: RunState, result: StepResult, stream: ExampleStream,
                  faults: FaultPlan) -> None:
    """Book a step whose update was not applied: an fp16 overflow (expected now and then; the scale
    backs off) or a non-finite loss/gradient (the recipe's policy). Stopping saves the last good state."""
    try:
        if result.overflow:
            state.loss_scale_overflows += 1
            if s.scaler.collapsed:
                raise TrainingStopped(
                    f"fp16 gradients overflowed {s.scaler.overflows_in_row} steps in a row (loss scale now "
                    f"{s.scaler.get_scale():g}): they are not finite at any scale; the last good state is saved",
                    EXIT_NONFINITE)
        else:
            _nonfinite(s, state, result)
    except TrainingStopped:
        save_checkpoint(s, state.to_json(), stream, faults)
        raise


def run_loop(s: Session, state: RunState, stream: ExampleStream, log: MetricsLog, flag: PreemptFlag,
             faults: FaultPlan) -> RunState:
    cfg = s.recipe
    progress = Progress(cfg.train.max_steps, state.step, enabled=cfg.logging.progress and s.env.is_main)
    try:
        while state.step < cfg.train.max_steps:
            lr = s.scheduler.get_last_lr()[0]
            result = train_step(s, [next(stream) for _ in range(cfg.train.grad_accum)],
                                poison=faults.poison_loss(state.step + 1),
                                backward_factor=faults.backward_factor(state.step + 1))
            state.step += 1
            progress.update(result.loss, lr)
            state.step_times.append(result.seconds)
            state.tokens.append(result.tokens)
            record = {"step": state.step, "loss": round(result.loss, 6), "lr": lr,
                      "grad_norm": round(result.grad_norm, 6), "tokens_per_s": round(result.tokens / result.seconds, 2)}
            if s.scaler.enabled:
                record["loss_scale"] = s.scaler.get_scale()
            if result.skipped:
                record["skipped"] = "loss_scale_overflow" if result.overflow else "nonfinite"
            else:
                state.last_loss = result.loss
                state.nonfinite_in_row = 0
            faults.after_step(state.step)
            preempted = s.engine.any_rank(bool(flag))  # every rank stops at the same step
            if result.skipped:
                if s.env.is_main:  # logged before the policy can stop the run
                    log.write(record)
                    progress.line(record)
                _skipped_step(s, state, result, stream, faults)
            every = cfg.train.eval_every_steps
            if every and state.step % every == 0:
                state.last_eval_loss = evaluate(s, flag)
                record["eval_loss"] = state.last_eval_loss
            logged_step = state.step % cfg.logging.every_steps == 0 or state.step == cfg.train.max_steps
            if s.env.is_main and logged_step and not result.skipped:
                log.write(record)
                progress.line(record)
            ck = cfg.checkpoint.every_steps
            if preempted or state.step == cfg.train.max_steps or (ck and state.step % ck == 0):
                save_checkpoint(s, state.to_json(), stream, faults)
            if preempted:
                raise TrainingStopped(f"preempted by signal {flag.signal or 'on another rank'}; saved step {state.step}; "
                                      "run the same command to resume", EXIT_PREEMPTED)
    finally:
        progress.close()
    return state
