"""The training loop: accumulate, clip, step, log, evaluate, snapshot, summarize."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from qtrain.checkpoint.adapter_io import save_adapter
from qtrain.checkpoint.snapshots import prune_snapshots, snapshot_dir
from qtrain.data import BatchStream, collate
from qtrain.train.loss import causal_lm_loss_sum, count_trained_tokens
from qtrain.train.metrics import MetricsLog, median_step_s, param_counts, peak_memory_mib
from qtrain.train.setup import Session


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    seconds: float


@dataclass
class RunState:
    step: int = 0
    step_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    last_loss: float = math.nan
    last_eval_loss: float | None = None


def _autocast(s: Session):
    if s.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=s.device.type, dtype=s.autocast_dtype)


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def loss_sum_of(s: Session, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with _autocast(s):
        logits = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_lm_loss_sum(logits, batch["labels"])


def train_step(s: Session, micro_batches: list[list[int]]) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches; the loss is the mean over all their trained tokens."""
    t0 = time.perf_counter()
    pad = s.tokenizer.pad_token_id
    batches = [_batch_to(collate([s.data.train[i] for i in idx], pad), s.device) for idx in micro_batches]
    n_trained = max(1, sum(count_trained_tokens(b["labels"]) for b in batches))
    total = 0.0
    for batch in batches:
        loss_sum = loss_sum_of(s, batch)
        (loss_sum / n_trained).backward()
        total += float(loss_sum.detach())
    params = [p for g in s.optimizer.param_groups for p in g["params"]]
    clip = s.recipe.train.grad_clip if s.recipe.train.grad_clip is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)
    return StepResult(total / n_trained, grad_norm, tokens, time.perf_counter() - t0)


@torch.no_grad()
def evaluate(s: Session) -> float | None:
    """Mean next-token NLL over the eval split (None without one)."""
    examples = s.data.eval
    if not examples:
        return None
    mb = s.recipe.train.micro_batch_size
    chunks = [examples[i:i + mb] for i in range(0, len(examples), mb)]
    if s.recipe.train.eval_batches:
        chunks = chunks[: s.recipe.train.eval_batches]
    s.model.eval()
    total, count = 0.0, 0
    for chunk in chunks:
        batch = _batch_to(collate(chunk, s.tokenizer.pad_token_id), s.device)
        total += float(loss_sum_of(s, batch))
        count += count_trained_tokens(batch["labels"])
    s.model.train()
    return total / max(1, count)


def _should(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def run_loop(s: Session, state: RunState, stream: BatchStream, log: MetricsLog) -> RunState:
    cfg, out = s.recipe, s.recipe.output_dir
    bar = tqdm(total=cfg.train.max_steps, initial=state.step, desc="train", unit="step",
               disable=not (cfg.logging.progress and s.env.is_main), dynamic_ncols=True)
    while state.step < cfg.train.max_steps:
        lr = s.scheduler.get_last_lr()[0]
        result = train_step(s, [next(stream) for _ in range(cfg.train.grad_accum)])
        state.step += 1
        state.step_times.append(result.seconds)
        state.tokens.append(result.tokens)
        state.last_loss = result.loss
        record = {"step": state.step, "loss": round(result.loss, 6), "lr": lr,
                  "grad_norm": round(result.grad_norm, 6), "tokens_per_s": round(result.tokens / result.seconds, 2)}
        if _should(cfg.train.eval_every_steps, state.step, -1) and cfg.train.eval_every_steps:
            state.last_eval_loss = evaluate(s)
            record["eval_loss"] = state.last_eval_loss
        if s.env.is_main and _should(cfg.logging.every_steps, state.step, cfg.train.max_steps):
            log.write(record)
        if s.env.is_main and cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0 \
                and state.step < cfg.train.max_steps:
            save_adapter(s.model, cfg.peft, str(s.base_dir.resolve()), snapshot_dir(out, state.step))
            prune_snapshots(out, cfg.checkpoint.keep)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
    bar.close()
    return state


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
        "global_batch_size": mb * ga * s.env.world_size,
        "world_size": s.env.world_size,
        "device": str(s.device),
        "quant": s.recipe.quant.method,
        "lora_layers": len(s.target_names),
        "data": vars(s.data.report),
    }
