"""Save a full training checkpoint at a step boundary (adapter, optimizer, schedule, data, RNG)."""

from __future__ import annotations

from qtrain.checkpoint import store
from qtrain.checkpoint.space import checkpoint_mib, disk_full_stop
from qtrain.checkpoint.train_state import save_rank_state, save_shared_state
from qtrain.data.pipeline import ExampleStream
from qtrain.distributed import ddp
from qtrain.distributed import deepspeed as ds
from qtrain.train.faults import FaultPlan
from qtrain.train.setup import Session


def trainer_state(s: Session, run_state: dict, stream: ExampleStream) -> dict:
    return {"step": run_state["step"], "scheduler": s.scheduler.state_dict(), "data": stream.state_dict(),
            "run": run_state, "world_size": s.env.world_size, "seed": s.recipe.seed, "scaler": s.scaler.state_dict()}


def checkpoint_optimizer(s: Session):
    """What `optimizer.safetensors` holds: the optimizer, or under ZeRO the layout of its per-rank shards."""
    if s.engine is None:
        return s.optimizer
    return ds.ShardedOptimizer(ds.zero_stage(s.engine), s.env.world_size)


def checkpoint_size_mib(s: Session) -> float:
    return checkpoint_mib(sum(p.numel() for p in s.model.parameters() if p.requires_grad), s.recipe.train.optimizer)


def newest_checkpoint_text(out) -> str:
    steps = store.committed_steps(out)
    return f"{steps[0][1].name} is the newest complete checkpoint" if steps else "no checkpoint was saved yet"


def save_checkpoint(s: Session, run_state: dict, stream: ExampleStream, faults: FaultPlan) -> None:
    """Save every part of the step's state inside the commit protocol; a full disk stops the run cleanly."""
    step = run_state["step"]
    out = s.recipe.output_dir
    with disk_full_stop(f"checkpoint step-{step}", store.checkpoints_root(out), checkpoint_size_mib(s),
                        newest_checkpoint_text(out), cleanup=lambda: store.abort(out, step)):
        _save(s, run_state, stream, faults)


def _save(s: Session, run_state: dict, stream: ExampleStream, faults: FaultPlan) -> None:
    step = run_state["step"]
    out = s.recipe.output_dir
    # All ranks write into one temporary dir: rank 0 creates it, each adds its RNG state, and
    # rank 0 commits once everyone is done.
    tmp = store.begin(out, step, shared=s.env.world_size > 1) if s.env.is_main else store.pending_dir(out, step)
    ddp.barrier()
    save_rank_state(tmp, s.env.rank)
    if s.engine is not None:  # ZeRO: each rank holds one partition of the optimizer state
        ds.save_optimizer_shard(s.engine, tmp, s.env.rank)
    faults.file_saved()
    ddp.barrier()
    if s.env.is_main:
        if s.engine is not None:
            ds.check_adapter_whole(s.model)
        save_shared_state(tmp, model=s.model, peft_cfg=s.recipe.peft, base_model=str(s.base_dir.resolve()),
                          optimizer=checkpoint_optimizer(s), trainer_state=trainer_state(s, run_state, stream),
                          on_file=faults.file_saved)
        store.commit(tmp, step, {"world_size": s.env.world_size})
        store.prune(out, s.recipe.checkpoint.keep)
    ddp.barrier()
