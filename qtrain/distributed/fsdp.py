"""torch FSDP2: the 4-bit base, the unquantized weights and the adapter sharded across ranks.

`fully_shard` wraps each decoder block (the model's `_no_split_modules` classes), the input and
output embeddings when untied (`embedding_units`), then the root (the rest: the final norm). A
block's weights are all-gathered just before its forward and again before its backward, and freed
after each: the fused-kernel dispatch and the LoRA autograd function see whole bytes and never
know. The NF4 weights are uint8 parameters of one row per quantization block (see `NF4Weight`):
FSDP2 shards them on whole blocks and all-gathers them as bytes, never through a float cast.

Loading: the loader already kept only this rank's rows of every frozen tensor (`row_shard`), in
FSDP2's own Shard(0) layout. `wrap` puts meta placeholders of the whole shapes in their place,
lets `fully_shard` build its sharded parameters on meta, and then hands it the loaded rows as
DTensors (`load_state_dict(assign=True)`, FSDP2's own path for pre-sharded state), so no rank
ever holds more than its share. The adapter is created whole (the same seeded values as one
process) and `fully_shard` cuts it.

Checkpoints: the adapter is gathered whole into PEFT files (as every engine writes it); the
optimizer state goes through `torch.distributed.checkpoint` into safetensors files, one per rank
with each shard's offsets (`HuggingFaceStorageWriter(save_distributed=True)`; its reader builds
the metadata from the safetensors headers, so nothing is unpickled). DCP re-shards on load, so a
checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from qtrain.checkpoint.train_state import required_files
from qtrain.checkpoint.tree import flatten, unflatten
from qtrain.config.schema import Recipe
from qtrain.distributed import collectives
from qtrain.distributed.engine import MakeOptimizer, check_whole, local_shards, repeated_blocks, trainable
from qtrain.distributed.env import DistEnv
from qtrain.distributed.plain import PlainEngine
from qtrain.errors import CheckpointError, ModelError
from qtrain.quant.shard import RowShard

DCP_DIR = "optimizer-dcp"


class FSDPEngine(PlainEngine):
    name = "fsdp"
    owns_forward = True
    reshards = True
    supports_loss_scaling = False  # GradScaler's unscale on DTensor shards is untested here
    gathers_parameters = True

    def __init__(self, recipe: Recipe, env: DistEnv) -> None:
        super().__init__(recipe, env)
        from torch.distributed.device_mesh import init_device_mesh

        collectives.ensure_process_group(env, recipe.distributed.timeout_s)
        self.mesh = init_device_mesh(self.device.type, (env.world_size,))
        self._saved_record: dict | None = None
        self._tree: str | None = None

    def row_shard(self) -> RowShard:
        return RowShard(self.env.rank, self.env.world_size, collectives.all_gather)

    def wrap(self, model: nn.Module, make_optimizer: MakeOptimizer) -> torch.optim.Optimizer:
        from torch.distributed.fsdp import fully_shard

        pending = _detach_local_shards(model)
        for unit in decoder_blocks(model) + embedding_units(model):
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        _adopt_local_shards(pending, self.mesh)
        self.model = self.forward_model = model
        self.optimizer = make_optimizer(trainable(model))
        return self.optimizer

    def accumulating(self, last: bool):
        """Reduce-scatter gradients only after the last micro-batch of a step (like DDP's no_sync)."""
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float | None) -> float:
        from torch.distributed.tensor import DTensor

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    @contextlib.contextmanager
    def whole_trainable(self, modify: bool = False):
        """The trainable DTensors swapped for whole tensors (all-gathered on every rank); with
        `modify`, whatever was loaded into them is cut back into this rank's shard on exit."""
        from torch.distributed.tensor import DTensor

        swapped = []
        for mod in self.model.modules():
            for leaf, p in list(mod._parameters.items()):
                if p is not None and p.requires_grad and isinstance(p, DTensor):
                    whole = nn.Parameter(p.full_tensor().detach(), requires_grad=True)
                    mod._parameters[leaf] = whole
                    swapped.append((mod, leaf, p, whole))
        try:
            check_whole(self.model)
            yield
        finally:
            for mod, leaf, sharded, whole in swapped:
                if modify:
                    start, stop = self.row_shard().rows(whole.shape[0])
                    with torch.no_grad():
                        sharded._local_tensor.copy_(whole[start:stop])
                mod._parameters[leaf] = sharded

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_files(self, method: str) -> list[str]:
        # Only rank 0's RNG is certain to exist: a checkpoint of fewer processes re-shards here.
        return required_files(1, method)

    def optimizer_record(self) -> _Record:
        return _Record(self)

    def save_state(self, tmp: Path) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        tree, tensors = flatten(get_optimizer_state_dict(self.model, self.optimizer), "optimizer", copy=False)
        save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True))
        self._tree = json.dumps(tree)

    def load_state(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        saved = json.loads(self._saved_record["tree"])
        _, tensors = flatten(get_optimizer_state_dict(self.model, self.optimizer), "optimizer", copy=False)
        try:
            load(tensors, storage_reader=HuggingFaceStorageReader(str(ckpt / DCP_DIR)))
            state = unflatten(saved, tensors)
        except Exception as exc:  # noqa: BLE001 - DCP and safetensors raise many types
            raise CheckpointError(f"{ckpt / DCP_DIR}: cannot load the sharded optimizer state ({exc}); resume with "
                                  "the recipe that wrote it") from None
        set_optimizer_state_dict(self.model, self.optimizer, state)

    # -- sizes ---------------------------------------------------------------------------
    def local_bytes(self, p: torch.Tensor) -> int:
        local = p.to_local() if hasattr(p, "to_local") else p
        return local.untyped_storage().nbytes()


class _Record:
    """What `optimizer.safetensors` holds under FSDP: the layout and the optimizer state's JSON
    structure (the tensors are in the DCP files); loading it keeps it for `load_state`."""

    def __init__(self, engine: FSDPEngine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        return {"engine": "fsdp", "dir": DCP_DIR, "world_size": self.engine.env.world_size, "tree": self.engine._tree}

    def load_state_dict(self, state: dict) -> None:
        if state.get("engine") != "fsdp" or not isinstance(state.get("tree"), str):
            raise ValueError(f"not an FSDP optimizer record: {sorted(state)}")
        self.engine._saved_record = state


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (`repeated_blocks`); ModelError when it names none."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise ModelError(f"distributed.engine: fsdp shards per decoder block, but {type(model).__name__} names no "
                         "block class (transformers' _no_split_modules); use distributed.engine: ddp or deepspeed")
    return blocks


def embedding_units(model: nn.Module) -> list[nn.Module]:
    """The input and output embeddings as units of their own, when they share no weight.

    In the root unit they would stay gathered from the first forward op to the end of backward
    (FSDP2 keeps the root unsharded after forward): at a 32k vocabulary and hidden 2048 that is
    2 x 262 MB fp32 whole on every rank. On their own each is gathered only around its use (the
    frozen input embedding not at all in backward) and freed after.
    """
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return []  # not a transformers model
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or getattr(inp, "weight", None) is getattr(out, "weight", None):
        return []
    return [inp, out]


def _detach_local_shards(model: nn.Module) -> list[tuple[list[tuple[nn.Module, str]], torch.Tensor, torch.Size]]:
    """Swap every loaded local shard for a meta placeholder of the whole shape (ties kept)."""
    pending = local_shards(model)
    for owners, local, shape in pending:
        meta = nn.Parameter(torch.empty(shape, dtype=local.dtype, device="meta"), requires_grad=False)
        for mod, leaf in owners:
            mod._parameters[leaf] = meta
    return pending


def _adopt_local_shards(pending, mesh) -> None:
    """Give FSDP2 the loaded rows as its shards (DTensors over `mesh`, Shard(0))."""
    from torch.distributed.tensor import DTensor, Shard

    for owners, local, shape in pending:
        stride = torch.empty(shape, device="meta").stride()
        value = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
        (mod, leaf), aliases = owners[0], owners[1:]
        mod.load_state_dict({leaf: value}, strict=False, assign=True)
        for alias_mod, alias_leaf in aliases:
            alias_mod._parameters[alias_leaf] = mod._parameters[leaf]
