"""Each engine's share of a device's memory, as data: what it partitions and what buffers it adds.

A new engine is one more `EngineShares` entry; the component functions read these fields and
never branch on the engine's name. The values describe what the engines do with qtrain's
parameters (measured on CPU for DDP and ZeRO-2 by tests/integration/test_plan_measured.py):

- DDP keeps one flat fp32 bucket per group of trainable parameters beside their `.grad`
  (`gradient_as_bucket_view` is off): one more fp32 copy of the adapter.
- DeepSpeed ZeRO-1/2 flatten the trainable parameters (the model's params become views of the
  flat buffer), keep an fp32 master copy of this rank's partition and the optimizer state of that
  partition only; ZeRO-2 also keeps gradients as a partition. With `contiguous_gradients`
  (DeepSpeed's default) both stages allocate a reduce bucket of `reduce_bucket_size` elements
  (default 5e8: 1.9 GiB in fp32) at every backward, twice with `overlap_comm` -- whatever the
  adapter's size (measured on CPU: 2 ranks of a 0.3M-parameter adapter each hold 2.0 GB).
- ZeRO-3 and FSDP2 partition everything, base included, and gather one decoder block's
  parameters at a time; with prefetching the next block is gathered while one runs, so two
  blocks are whole at once.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace

from qtrain.config.schema import DistributedConfig, Recipe
from qtrain.errors import ConfigError

DS_REDUCE_BUCKET_DEFAULT = 500_000_000  # deepspeed.runtime.zero.config: reduce_bucket_size


@dataclass(frozen=True)
class EngineShares:
    name: str
    shards_base: bool = False        # frozen base (NF4 and dense) partitioned over ranks
    shards_adapter: bool = False     # trainable parameters partitioned
    shards_grads: bool = False       # gradients kept as this rank's partition
    shards_optimizer: bool = False   # optimizer state of this rank's partition only
    master_copy: bool = False        # an fp32 copy of this rank's partition of the trainable params
    grad_buckets: bool = False       # DDP's flat fp32 buckets, one copy of the trainable params
    reduce_bucket_elems: int = 0     # DeepSpeed reduce bucket allocated at each backward (fp32 elements)
    gathered_blocks: int = 0         # decoder blocks whole at once (sharded engines)
    optimizer_sees_flat: bool = False  # the optimizer steps one flat partition (8-bit rules apply to it)

    @property
    def landed(self) -> bool:
        """Whether this qtrain can run the engine yet (else the plan is on paper)."""
        return self.name in runnable_engines()


ENGINES = {
    "plain": EngineShares("plain"),
    "ddp": EngineShares("ddp", grad_buckets=True),
    "zero1": EngineShares("zero1", shards_optimizer=True, master_copy=True, reduce_bucket_elems=DS_REDUCE_BUCKET_DEFAULT,
                          optimizer_sees_flat=True),
    "zero2": EngineShares("zero2", shards_grads=True, shards_optimizer=True, master_copy=True,
                          reduce_bucket_elems=DS_REDUCE_BUCKET_DEFAULT, optimizer_sees_flat=True),
    "zero3": EngineShares("zero3", shards_base=True, shards_adapter=True, shards_grads=True, shards_optimizer=True,
                          master_copy=True, reduce_bucket_elems=DS_REDUCE_BUCKET_DEFAULT, gathered_blocks=2,
                          optimizer_sees_flat=True),
    "fsdp": EngineShares("fsdp", shards_base=True, shards_adapter=True, shards_grads=True, shards_optimizer=True,
                         gathered_blocks=2),
}


def runnable_engines() -> set[str]:
    """Engines this checkout runs: the recipe schema's engines, and the DeepSpeed stages it accepts."""
    from qtrain.distributed import deepspeed as ds

    names = set(typing.get_args(typing.get_type_hints(DistributedConfig)["engine"])) & set(ENGINES)
    if "deepspeed" in typing.get_args(typing.get_type_hints(DistributedConfig)["engine"]):
        names |= {f"zero{stage}" for stage in ds.SUPPORTED_STAGES}
    return names


def _zero_settings(recipe: Recipe) -> dict:
    """The recipe's DeepSpeed `zero_optimization` section (the file the trainer reads), or {}."""
    from qtrain.distributed import deepspeed as ds

    path = recipe.distributed.deepspeed_config
    zero = ds.read_user_config(path).get("zero_optimization", {}) if path else {}
    return zero if isinstance(zero, dict) else {}


def _zero_engine(stage: int, zero: dict) -> EngineShares:
    """ZeRO-`stage` with the reduce bucket `zero` asks for (DeepSpeed's defaults where it is silent)."""
    engine = ENGINES[f"zero{stage}"]
    if not zero.get("contiguous_gradients", True):
        return replace(engine, reduce_bucket_elems=0)
    buckets = 2 if zero.get("overlap_comm", stage == 3) else 1
    return replace(engine, reduce_bucket_elems=buckets * int(zero.get("reduce_bucket_size", DS_REDUCE_BUCKET_DEFAULT)))


def resolve_engine(recipe: Recipe, world: int, flag: str | None = None) -> EngineShares:
    """The engine a run of `recipe` on `world` processes gets (`distributed.engine: auto` decides as
    the trainer does), or the one `flag` (--engine) names."""
    from qtrain.distributed import deepspeed as ds

    name = flag if flag not in (None, "auto") else recipe.distributed.engine
    zero = _zero_settings(recipe)
    if name in ("auto", "deepspeed") and ds.enabled(recipe):
        stage = zero.get("stage", 0)
        if stage not in (1, 2, 3):
            raise ConfigError(f"distributed.deepspeed_config: {recipe.distributed.deepspeed_config} sets "
                              f"zero_optimization.stage {stage!r}; the planner models stages 1, 2 and 3")
        return _zero_engine(stage, zero)
    if name == "auto":
        name = "ddp" if world > 1 else "plain"
    if name not in ENGINES:
        raise ConfigError(f"--engine: unknown engine {name!r}; use one of auto, {', '.join(ENGINES)}")
    if name == "plain" and world > 1:
        raise ConfigError(f"--engine: 'plain' is single-process, but {world} processes were asked for (--gpus); "
                          "use ddp, zero2, zero3 or fsdp")
    if name.startswith("zero"):
        stage = int(name[-1])
        return _zero_engine(stage, zero if zero.get("stage") == stage else {})
    return ENGINES[name]
