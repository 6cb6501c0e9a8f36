"""Everything a run needs before its first step, built in the order that fails fastest.

tokenizer → data (DataError before any file is written) → base model dir → streamed 4-bit
model → adapters (or, for full fine-tuning, every weight trainable) → optimizer/schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtrain.config.schema import Recipe
from qtrain.data import DataBundle, build_datasets, data_cache_dir
from qtrain.distributed import collectives
from qtrain.distributed.engine import Engine, create_engine
from qtrain.distributed.env import DistEnv
from qtrain.errors import ConfigError
from qtrain.models.arch import is_encoder_decoder, model_is_encoder_decoder, plain_lm_head
from qtrain.models.build import write_random_base
from qtrain.models.load import load_model
from qtrain.models.precision import Precision, resolve_precision, storage_dtype
from qtrain.models.tokenizer import load_tokenizer
from qtrain.peft.recompute import checkpoint_kwargs
from qtrain.peft.registry import method_for
from qtrain.plan.planner import check_recompute, resolve_recompute
from qtrain.plan.recompute_choice import NO_CHECKPOINTING, RecomputeChoice
from qtrain.plan.target import available_memory
from qtrain.quant.nf4 import NF4Spec
from qtrain.quant.shard import RowShard
from qtrain.train.host_memory import (HostAllocator, choose_host_allocator, fix_mmap_threshold,
                                      release_cached_blocks, threshold_for)
from qtrain.train.optim import build_optimizer, build_scheduler
from qtrain.train.packing_check import configure_batches
from qtrain.train.scaler import LossScaler
from qtrain.train.sinks import check_available as check_loggers
from qtrain_kernels import dispatch


@dataclass
class Session:
    recipe: Recipe
    env: DistEnv
    device: torch.device
    tokenizer: object
    data: DataBundle
    base_dir: Path
    model: nn.Module
    target_names: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast_dtype: torch.dtype | None
    # The compute dtype `model.dtype` resolved to on this device, and why (model.dtype: auto).
    precision: Precision
    # fp16 dynamic loss scaling (a no-op for bf16/fp32 compute).
    scaler: LossScaler
    # What forward runs through: the DDP or DeepSpeed wrapper under data parallelism, else `model`.
    forward_model: nn.Module
    # How the model is placed, stepped and checkpointed (qtrain.distributed.engine).
    engine: Engine | None = None
    # Backend of the fused linear + cross-entropy loss, or None for the logits path (see fused_ce_backend()).
    fused_ce_backend: str | None = None
    # Torch's allocator for CPU tensors (train.host_allocator), and why.
    host_allocator: HostAllocator | None = None
    # What gradient checkpointing recomputes (train.recompute, `auto` resolved), and why.
    recompute: RecomputeChoice = NO_CHECKPOINTING


def kernel_backend(recipe: Recipe) -> str:
    try:
        return dispatch.resolve(recipe.kernels)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def fused_ce_backend(recipe: Recipe, model: nn.Module, engine_owns_forward: bool) -> str | None:
    """The kernel backend the fused linear + cross-entropy loss runs on (its row step: the Triton kernel
    with `kernels: triton`, else torch), or None for the logits path. The fused loss never holds the
    [tokens x vocab] logits and their fp32 copies; it needs a plain lm_head, a decoder-only model, a
    method that allows it, and an engine that lets the loss call submodules directly (under
    DDP/DeepSpeed/FSDP the forward must go through their wrapper or hooks)."""
    if engine_owns_forward or not plain_lm_head(model):
        return None
    if model_is_encoder_decoder(model):  # the fused loss is written for decoder-only LMs
        return None
    if not method_for(recipe.peft).fused_loss:  # e.g. full fine-tuning's fp32 head, virtual tokens
        return None
    return kernel_backend(recipe)


def autocast_dtype(recipe: Recipe, precision: Precision) -> torch.dtype | None:
    """Autocast in the 16-bit compute dtype (`auto`/`on`); bf16 when forced `on` over fp32 weights; else none."""
    mode = recipe.train.autocast
    if mode == "off":
        return None
    if precision.dtype in (torch.bfloat16, torch.float16):
        return precision.dtype
    return torch.bfloat16 if mode == "on" else None


def needs_loss_scaling(precision: Precision, autocast: torch.dtype | None) -> bool:
    """fp16 compute (weights or autocast) needs dynamic loss scaling; bf16 has fp32's exponent range."""
    return torch.float16 in (precision.dtype, autocast)


def free_for_recompute(recipe: Recipe, device: torch.device, env: DistEnv) -> int | None:
    """The free memory `train.recompute: auto` plans with: the least any rank has now, so that every
    rank picks the same mode (None where auto is not asked for, or a rank cannot tell)."""
    if not (recipe.train.gradient_checkpointing and recipe.train.recompute == "auto"):
        return None
    free = available_memory(device, env.local_world_size)
    free = collectives.min_over_ranks(-1 if free is None else free, device)
    return None if free < 0 else free


def resolve_base_dir(recipe: Recipe, tokenizer, env: DistEnv = DistEnv()) -> Path:
    m = recipe.model
    if m.path is not None:
        return Path(m.path)
    base_dir = Path(m.base_dir) if m.base_dir else Path(recipe.output_dir) / "base"
    if env.is_main:  # one writer; the other ranks read it once it is complete
        write_random_base(m.from_config, tokenizer, recipe.seed, storage_dtype(m.dtype), base_dir)
    collectives.barrier()
    return base_dir


def build_model(recipe: Recipe, base_dir: Path, device: torch.device, precision: Precision | None = None,
                tokenizer=None, shard: RowShard = RowShard(), recompute: str | None = None
                ) -> tuple[nn.Module, list[str]]:
    """The streamed (4-bit) base with the recipe's method attached; only the method's parameters
    require grad. Returns the model and the names of the modules the method adapted. Under an
    engine that shards the base, each rank loads only its rows (`shard`); the adapter is created whole.

    The base loads in the compute dtype `model.dtype` resolves to on `device` unless the method
    needs otherwise (full fine-tuning: fp32 master weights, unquantized; compute still runs under
    the recipe's autocast). With gradient checkpointing, `recompute` is the mode (None: the recipe's,
    `auto` resolved here for one process, before loading, as `prepare` does)."""
    method = method_for(recipe.peft)
    if recipe.train.gradient_checkpointing and recompute in (None, "auto"):
        recompute = resolve_recompute(recipe, base_dir, device.type, available_memory(device)).mode
    precision = precision or resolve_precision(recipe.model.dtype, device)
    opts = method.load_options(recipe.peft, precision.dtype, recipe.quant.method == "nf4")
    spec = NF4Spec(recipe.quant.blocksize, recipe.quant.double_quant) if opts.quantize else None
    model = load_model(base_dir, opts.dtype, device, spec, kernel_backend(recipe), recipe.model.trust_remote_code,
                       shard, dense=opts.dense)
    names = method.inject(model, recipe.peft, tokenizer)
    model.config.use_cache = False
    if recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(recompute))
        # transformers also makes the token embeddings' output require grad, which only reentrant
        # checkpointing needs: with a frozen embedding it costs the first layer's input-gradient GEMMs
        # and, under ZeRO-3, a gather of the whole embedding matrix in every backward.
        model.disable_input_require_grads()
        method.enable_checkpointing(model, recompute)
    release_cached_blocks()  # loading's transients (with the caching host allocator): a step does not reuse them
    return model, names


def prepare(recipe: Recipe, env: DistEnv) -> Session:
    kernel_backend(recipe)  # refuse an impossible kernels= before any work
    check_loggers(recipe.logging)
    engine = create_engine(recipe, env)  # likewise an impossible engine setting
    check_recompute(recipe, env.world_size)  # and a recompute mode that engine cannot run
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    fix_mmap_threshold(threshold_for(engine.gathers_parameters))  # large frees go back to the system
    if recipe.train.deterministic:
        torch.use_deterministic_algorithms(True)
    device = env.device()
    host_allocator = choose_host_allocator(recipe.train.host_allocator, device)
    precision = resolve_precision(recipe.model.dtype, device)
    autocast = autocast_dtype(recipe, precision)
    scaling = needs_loss_scaling(precision, autocast)
    if scaling and not engine.supports_loss_scaling:
        raise ConfigError(f"model.dtype: fp16 compute needs loss scaling, which qtrain does not run under "
                          f"distributed.engine: {engine.name} yet ({precision.reason}); set model.dtype: float32 "
                          "(or bfloat16 on a GPU that has it), or use distributed.engine: ddp")
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    data = build_datasets(recipe.data, tokenizer, recipe.seed, encoder_decoder=is_encoder_decoder(recipe.model),
                          cache_dir=data_cache_dir(recipe.data, recipe.output_dir),
                          progress=recipe.logging.progress and env.is_main, local_world_size=env.local_world_size)
    base_dir = resolve_base_dir(recipe, tokenizer, env)
    torch.manual_seed(recipe.seed)  # LoRA A init
    shard = engine.row_shard()
    free = free_for_recompute(recipe, device, env)
    recompute = resolve_recompute(recipe, base_dir, device.type, free, env.world_size)
    model, names = build_model(recipe, base_dir, device, precision, tokenizer, shard, recompute.mode)
    model.train()
    optimizer = engine.wrap(model, lambda params: build_optimizer(params, recipe.train, device))
    # A rank holding a share of the base runs the packed-attention probe through the engine (it gathers).
    configure_batches(data, recipe.data.padding_free, model, device, autocast,
                      None if shard.whole else engine.forward_model)
    scheduler = build_scheduler(optimizer, recipe.train)
    return Session(recipe, env, device, tokenizer, data, base_dir, model, names, optimizer, scheduler,
                   autocast, precision, LossScaler(scaling, device), engine.forward_model, engine,
                   fused_ce_backend(recipe, model, engine.owns_forward), host_allocator, recompute)
