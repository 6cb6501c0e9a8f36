"""Everything the memory model reads, normalized from a recipe and a target: one frozen value.

Suggestions (verdict.py) are `dataclasses.replace` on this value, each paired with the recipe
override or flag that makes the same change, so what the planner proposes is what a run gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtrain.config.schema import Recipe
from qtrain.peft.registry import method_for
from qtrain.plan.engines import EngineShares, resolve_engine
from qtrain.plan.model_shape import ModelShape, model_shape
from qtrain.plan.target import DTYPE_BYTES, Target, compute_dtype_name, model_dtype_name


@dataclass(frozen=True)
class Settings:
    shape: ModelShape
    method: str              # lora | full
    r: int
    dropout: float
    model_dtype: str         # dtype of the unquantized base tensors
    compute_dtype: str       # dtype of matmuls and saved activations
    blocksize: int
    double_quant: bool
    micro_batch: int
    max_len: int
    grad_accum: int
    packing: bool
    checkpointing: bool
    recompute: str           # full | mlp | attention | matmuls (auto before plan_recipe resolves it)
    optimizer: str
    fused_ce: bool           # chunked linear + cross-entropy instead of the logits tensor
    fused_lora: bool         # Triton LoRA kernels: the NF4 weight is never dequantized whole
    engine: EngineShares
    world: int
    device: str              # cpu | cuda

    @property
    def tokens(self) -> int:
        """Tokens one micro-batch holds on one rank (rows are padded or packed to max_len)."""
        return self.micro_batch * self.max_len

    @property
    def a(self) -> int:
        """Bytes per element of activations (the compute dtype)."""
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def dense_bytes(self) -> int:
        """Bytes per unquantized base parameter: fp32 master weights under full fine-tuning."""
        return 4 if self.method == "full" else DTYPE_BYTES[self.model_dtype]

    @property
    def trainable(self) -> tuple[int, ...]:
        """Sizes of the trainable tensors: LoRA's A and B per adapted linear, or every parameter."""
        if self.method == "full":  # nothing is quantized: every parameter is in dense_numels
            return self.shape.dense_numels
        return tuple(n for lin in self.shape.adapted for n in (self.r * lin.in_features, lin.out_features * self.r))


def settings_from_recipe(recipe: Recipe, target: Target, engine_flag: str | None = None,
                         shape: ModelShape | None = None) -> Settings:
    """The planner's view of `recipe` run on `target` (`engine_flag`: --engine, else the recipe decides)."""
    shape = shape or model_shape(recipe)
    engine = resolve_engine(recipe, target.world, engine_flag)
    t, p = recipe.train, recipe.peft
    triton = recipe.kernels == "triton"  # on a CPU the run needs TRITON_INTERPRET=1, and then runs the same kernels
    single = target.world == 1 and engine.name == "plain"
    return Settings(
        shape=shape, method=p.method, r=p.r, dropout=p.dropout,
        model_dtype=model_dtype_name(recipe, target.device), compute_dtype=compute_dtype_name(recipe, target.device),
        blocksize=recipe.quant.blocksize, double_quant=recipe.quant.double_quant,
        micro_batch=t.micro_batch_size, max_len=recipe.data.max_len, grad_accum=t.grad_accum,
        packing=recipe.data.packing, checkpointing=t.gradient_checkpointing, recompute=t.recompute,
        optimizer=t.optimizer, fused_ce=single and method_for(p).fused_loss and shape.plain_head,
        fused_lora=triton, engine=engine, world=target.world, device=target.device)
