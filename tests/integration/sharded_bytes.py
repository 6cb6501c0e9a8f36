"""Run by test_sharding.py under torchrun, 2 processes: NF4 bytes survive sharding and gathering.

    python -m torch.distributed.run --nproc_per_node 2 tests/integration/sharded_bytes.py ZERO3.json

Each rank holds, as the loader leaves it, only its rows of one NF4 weight whose packed bytes
and absmax codes include every bf16/fp32 NaN and inf bit pattern (quiet and signalling), with a
block count the world size does not divide. The engine under test adopts the rows, a forward
and backward run through LoRA, and the bytes the layer sees must be the original ones, bit for
bit; the resident bytes per rank must be this rank's share. Prints "ok" on success.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from qtrain.config.schema import Recipe
from qtrain.distributed.collectives import destroy
from qtrain.distributed.engine import create_engine
from qtrain.distributed.env import read_env
from qtrain.peft.lora import LoRALinear
from qtrain.quant.linear import NF4Linear
from qtrain.quant.nf4 import NF4Spec, NF4Weight
from qtrain.quant.shard import mark_full_shape

SHAPE = (33, 64)  # 33 blocks of 64: 2 ranks hold 17 rows each, the last one zero padding
# Little-endian byte pairs of bf16 +inf, -inf, quiet NaN, signalling NaN, -NaN, and the bytes of
# fp32 signalling NaN 0x7FA00000 and quiet NaN 0xFFC00001.
PATTERNS = [0x80, 0x7F, 0x80, 0xFF, 0xC0, 0x7F, 0x81, 0x7F, 0xFF, 0xFF, 0x00, 0x00, 0xA0, 0x7F,
            0x01, 0x00, 0xC0, 0xFF]
SEEN: list[tuple[torch.Tensor, torch.Tensor]] = []


class Block(nn.Module):
    def __init__(self, nf4: NF4Weight) -> None:
        super().__init__()
        self.proj = LoRALinear(NF4Linear(nf4, None, "reference"), r=4, alpha=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nf4 = self.proj.base_layer.nf4
        SEEN.append((nf4.packed.detach().clone(), nf4.absmax.detach().clone()))
        return self.proj(x).clone()  # not a view: FSDP2 hooks its blocks' outputs


class Toy(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, nf4: NF4Weight) -> None:
        super().__init__()
        self.block = Block(nf4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def crafted(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole padded qweight and codes (patterns first), absmax2 and offset; the same on every rank."""
    g = torch.Generator().manual_seed(0)
    blocks = -(-SHAPE[0] * SHAPE[1] // 64)
    rows = -(-blocks // world) * world
    qweight = torch.randint(0, 256, (rows, 32), dtype=torch.uint8, generator=g)
    qweight.view(-1)[: len(PATTERNS)] = torch.tensor(PATTERNS, dtype=torch.uint8)
    qweight[blocks:] = 0
    codes = torch.randint(0, 256, (rows,), dtype=torch.uint8, generator=g)
    codes[: len(PATTERNS)] = torch.tensor(PATTERNS, dtype=torch.uint8)
    codes[blocks:] = 0
    return qweight, codes, torch.rand(1, generator=g) + 0.5, torch.tensor(0.01)


def check(kind: str, ds_config: str | None) -> None:
    SEEN.clear()
    env = read_env()
    recipe = Recipe()
    recipe.train.optimizer, recipe.train.micro_batch_size, recipe.train.grad_accum = "adamw", 1, 1
    recipe.distributed.engine = "fsdp" if kind == "fsdp" else "deepspeed"
    recipe.distributed.deepspeed_config = ds_config
    engine = create_engine(recipe, env)
    qweight, codes, absmax2, offset = crafted(env.world_size)
    start, stop = engine.row_shard().rows(qweight.shape[0])
    nf4 = NF4Weight(qweight[start:stop].clone(), codes[start:stop].clone(), SHAPE, torch.float32, NF4Spec(64, True),
                    absmax2, offset)
    mark_full_shape(nf4.qweight, qweight.shape)
    mark_full_shape(nf4.qabsmax, codes.shape)
    torch.manual_seed(0)
    model = Toy(nf4)
    engine.wrap(model, lambda params: torch.optim.AdamW(params, lr=1e-3))
    y = engine.forward_model(torch.randn(2, SHAPE[1]))
    engine.backward(y.float().pow(2).sum())
    assert engine.step(loss_finite=True).applied
    engine.forward_model(torch.randn(2, SHAPE[1]))
    numel = SHAPE[0] * SHAPE[1]
    for packed, absmax in SEEN:
        assert torch.equal(packed.view(-1), qweight.view(-1)[: numel // 2]), "packed bytes changed"
        assert torch.equal(absmax, codes[: numel // 64]), "absmax codes changed"
    share = (stop - start) * 33 + absmax2.numel() * 4 + 4
    assert engine.nf4_bytes(model) == share, (engine.nf4_bytes(model), share)
    print(f"rank {env.rank}: {kind} ok ({len(SEEN)} forwards)", flush=True)


if __name__ == "__main__":
    try:
        check("fsdp", None)
        check("zero3", sys.argv[1])
    finally:  # as a run does: a group left to interpreter teardown can abort the process (exit -6)
        destroy()
