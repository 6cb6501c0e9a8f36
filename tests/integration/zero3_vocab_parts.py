"""Run by test_sharding.py under torchrun, 2 processes: ZeRO-3 takes the frozen token embeddings and
LM head in row parts, and the model computes what it computed whole.

    python -m torch.distributed.run --nproc_per_node 2 tests/integration/zero3_vocab_parts.py ZERO3.json

A toy LM (embedding -> one block with a trainable linear -> bias-free head) whose vocabulary
matrices are several times a block's bytes, loaded as the loader leaves them (each rank its rows,
a row count the world size does not divide), untied and tied. After `wrap`: both are
`vocab_parts` modules of several parts, each part partitioned (a rank holds half of it), and one
step's loss and updated weights equal those of the same model run whole in this process.
Prints "ok" on success.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from qtrain.config.schema import Recipe
from qtrain.distributed.collectives import destroy
from qtrain.distributed.engine import create_engine
from qtrain.distributed.env import read_env
from qtrain.distributed.vocab_parts import PartedEmbedding, PartedLinear
from qtrain.quant.shard import mark_full_shape

VOCAB, HIDDEN = 301, 16  # 301 rows x 64 bytes: ~18.8 KiB, about 17 blocks' bytes


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class ToyLM(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.block = Block()
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        for p in (self.embed.weight, self.head.weight):
            p.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.embed = module

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.head = module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))


def loss_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.roll(-1, 1).reshape(-1), reduction="sum")


def adam(params) -> torch.optim.Optimizer:
    """eps 1: the first step moves each weight by lr * g / (|g| + 1), so it depends on the gradient's size."""
    return torch.optim.AdamW(params, lr=0.5, eps=1.0, weight_decay=0.0)


def keep_local_rows(model: nn.Module, start: int, stop: int) -> None:
    """What the loader leaves under a sharding engine: this rank's rows of each vocabulary matrix."""
    done = {}
    for mod in (model.embed, model.head):
        whole = mod.weight
        if id(whole) not in done:
            done[id(whole)] = nn.Parameter(whole.detach()[start:stop].clone(), requires_grad=False)
            mark_full_shape(done[id(whole)], whole.shape)
        mod.weight = done[id(whole)]


def check(tied: bool, ds_config: str) -> None:
    env = read_env()
    recipe = Recipe()
    recipe.train.optimizer, recipe.train.micro_batch_size, recipe.train.grad_accum = "adamw", 1, 1
    recipe.train.grad_clip = None  # the reference step below is unclipped
    recipe.distributed.engine, recipe.distributed.deepspeed_config = "deepspeed", ds_config
    engine = create_engine(recipe, env)
    torch.manual_seed(0)
    ref = ToyLM(tied)
    model = copy.deepcopy(ref)
    start, stop = engine.row_shard().rows(VOCAB)
    keep_local_rows(model, start, stop)
    engine.wrap(model, adam)

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embed) is PartedEmbedding and type(head) is PartedLinear, (type(embed), type(head))
    assert len(embed.parts) > 2 and len(head.parts) == len(embed.parts), len(embed.parts)
    assert (embed.parts[0].weight is head.parts[0].weight) == tied
    for part in [*embed.parts, *head.parts]:
        assert part.weight.ds_tensor.numel() == -(-part.weight.ds_numel // env.world_size), part.weight.ds_summary()

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # the same on both ranks
    loss = loss_of(engine.forward_model(ids), ids)
    engine.backward(loss)
    assert engine.step(loss_finite=True).applied
    ref_opt = adam([p for p in ref.parameters() if p.requires_grad])
    ref_loss = loss_of(ref(ids), ids)
    ref_loss.backward()
    ref_opt.step()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-6, atol=0)
    with engine.whole_trainable():
        # within 1e-6 as the sharding tests' adapters: the head's input gradient sums over the parts in
        # another order than one GEMM does
        torch.testing.assert_close(model.block.proj.weight.detach(), ref.block.proj.weight.detach(), rtol=0,
                                   atol=1e-6)
    print(f"rank {env.rank}: {'tied' if tied else 'untied'} ok ({len(embed.parts)} parts)", flush=True)


if __name__ == "__main__":
    try:
        check(False, sys.argv[1])
        check(True, sys.argv[1])
    finally:  # as a run does: a group left to interpreter teardown can abort the process (exit -6)
        destroy()
