"""What a training checkpoint holds, and putting it back: exact resume.

Files inside `checkpoints/step-N/` (see store.py for the commit protocol):
  adapter/ (or weights.safetensors, ...)   what trains, in the method's own form (its Method's
                                 checkpoint_files; an adapter dir is loadable on its own)
  optimizer.safetensors          optimizer state tensors; its metadata holds the JSON structure
  trainer_state.json             step, scheduler, data position, guard counters
  rng-rank-R.safetensors         torch CPU/CUDA generator states and Python's `random` state, per rank
Nothing is unpickled on load: tensors come from safetensors, the rest from JSON.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qtrain.checkpoint.resume import warn
from qtrain.checkpoint.tree import flatten, unflatten
from qtrain.errors import CheckpointError
from qtrain.peft.method import ArtifactContext
from qtrain.peft.registry import get_method
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank}.safetensors"


def required_files(world_size: int, method: str = "lora") -> list[str]:
    return get_method(method).checkpoint_files() + [OPTIMIZER, TRAINER_STATE] + [rng_file(r) for r in range(world_size)]


def _save_tree(obj: Any, path: Path, prefix: str) -> None:
    tree, tensors = flatten(obj, prefix)
    save_file(tensors, str(path), metadata={"tree": json.dumps(tree)})


def _load_tree(path: Path) -> Any:
    try:
        with safe_open(str(path), framework="pt") as fh:
            tree = json.loads(fh.metadata()["tree"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    return unflatten(tree, tensors)


def save_rank_state(tmp: Path, rank: int) -> None:
    """This rank's random generators (every rank calls this)."""
    state = {"torch_cpu": torch.get_rng_state(), "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    _save_tree(state, tmp / rng_file(rank), "rng")


def save_shared_state(tmp: Path, *, model, peft_cfg, base_model: str, optimizer, trainer_state: dict,
                      on_file: Callable[[], None] = lambda: None) -> None:
    """The method's trainable state, optimizer and trainer state (rank 0 writes these; ranks hold identical copies).

    `on_file` runs after each file is written (fault-injection tests crash there).
    """
    get_method(peft_cfg.method).save_checkpoint(model, ArtifactContext(peft_cfg, base_model), tmp)
    on_file()
    _save_tree(optimizer.state_dict(), tmp / OPTIMIZER, "optimizer")
    on_file()
    (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True))
    on_file()


def restore(ckpt: Path, rank: int, *, model, optimizer, method: str = "lora") -> dict:
    """Load the method's trainable state + optimizer + this rank's RNG from `ckpt`; returns the trainer state dict."""
    get_method(method).load_checkpoint(model, ckpt)
    try:
        optimizer.load_state_dict(_load_tree(ckpt / OPTIMIZER))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{ckpt / OPTIMIZER}: does not fit this run's optimizer ({exc}); "
                              "resume with the recipe that wrote it") from None
    trainer_state = read_trainer_state(ckpt)
    _restore_rng(ckpt, rank, trainer_state)
    return trainer_state


def read_trainer_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: unreadable ({exc})") from None


def _restore_rng(ckpt: Path, rank: int, trainer_state: dict) -> None:
    """This rank's generators; a rank the checkpoint never had (it was written by fewer processes,
    which only engines that re-shard accept) starts from a seed of its own instead."""
    if not (ckpt / rng_file(rank)).is_file():
        warn(f"{ckpt} holds no random state for rank {rank} (written by {trainer_state.get('world_size')} "
             "processes): this rank's random draws (dropout) start from a fresh seed")
        seed = int(trainer_state.get("seed", 0)) * 1_000_003 + int(trainer_state.get("step", 0)) * 997 + rank
        torch.manual_seed(seed)
        random.seed(seed)
        return
    rng = _load_tree(ckpt / rng_file(rank))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["torch_cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
