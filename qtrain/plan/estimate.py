"""Assemble the components into the step's phases; the plan's peak is the largest phase.

A step goes through three memory phases on each device:
- loss: the forward is done (all saved activations) and the loss runs its own peak; the
  gradients of earlier micro-batches are held when accumulating;
- backward: gradients are being written (and DeepSpeed's reduce bucket exists); with
  checkpointing one layer is recomputed with its dense weights; one layer's activation
  gradients and a dequantized weight are in flight;
- optimizer: gradients and the optimizer state (plus torch's foreach temporaries on CUDA).
Each phase is a dict of component -> bytes, so the table shows what the peak is made of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qtrain.plan import activations as act
from qtrain.plan import components as comp
from qtrain.plan.settings import Settings

# What a device needs besides the tensors the step holds, per device kind.
# cpu: resident memory of a `qtrain train` process beyond its tensors (Python, torch,
#   transformers, bitsandbytes, tokenizer, data, glibc's retained heap): peak RSS minus the plan's
#   tensor peak measured 697-750 MiB over four 3-step quickstart-sized runs (torch 2.13, 2 cores;
#   benchmarks/bench_plan.py records it per case). It turns the tensor peak into a figure
#   comparable with summary.json's `peak_memory_mib`, which is the peak RSS on a CPU.
# cuda: CUDA context, cuBLAS/NCCL workspaces and caching-allocator slack. Not measured yet (no
#   GPU was available): an assumed 1 GiB until benchmarks/bench_plan.py runs on a GPU.
OVERHEAD = {"cpu": 720 * 2**20, "cuda": 1 * 2**30}
OVERHEAD_MEASURED = {"cpu": True, "cuda": False}


@dataclass
class Plan:
    settings: Settings
    phases: dict[str, dict[str, int]]
    paged: int                  # optimizer state in CUDA unified memory (not counted on the device)
    capacity: int | None        # bytes per device, if known
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def peak(self) -> int:
        """Bytes of tensors one device holds at the step's peak (CUDA: max_memory_allocated)."""
        return sum(self.phases[self.peak_phase].values())

    @property
    def overhead(self) -> int:
        return OVERHEAD[self.settings.device]

    @property
    def needed(self) -> int:
        return self.peak + self.overhead

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.needed <= self.capacity

    @property
    def comparable_peak(self) -> int:
        """What summary.json's measured `peak_memory_mib` should read: the tensor peak on CUDA
        (max allocated); on CPU (peak RSS) the resident part of the tensors plus the process's
        runtime. DeepSpeed's reduce bucket is a `torch.empty` of which backward writes only the
        adapter's gradients: a CPU never makes the rest of its pages resident."""
        if self.settings.device != "cpu":
            return self.peak
        bucket = self.phases[self.peak_phase].get("reduce_bucket", 0)
        untouched = max(0, bucket - 4 * sum(self.settings.trainable))
        return self.peak - untouched + OVERHEAD["cpu"]


def _static(s: Settings) -> dict[str, int]:
    return {"base_nf4": comp.base_nf4(s), "base_dense": comp.base_dense(s), "adapter": comp.adapter(s),
            "optimizer": comp.optimizer_state(s), "master_copy": comp.master_copy(s),
            "grad_buckets": comp.grad_buckets(s)}


def _loss_phase(s: Settings) -> dict[str, int]:
    held = comp.gradients(s) if s.grad_accum > 1 else 0
    head = s.shape.vocab * s.shape.hidden * s.dense_bytes if s.engine.shards_base else 0
    return {"gradients": held, "reduce_bucket": comp.reduce_bucket(s), "gathered": head,
            "activations": act.saved_all_layers(s), "loss": act.loss_peak(s)}


def _backward_phase(s: Settings) -> dict[str, int]:
    # Backward is at its peak in the last layer (all activations still saved); a step without
    # accumulation has written that layer's gradients only by then.
    grads = comp.gradients(s) if s.grad_accum > 1 else math.ceil(comp.gradients(s) / s.shape.layers)
    return {"gradients": grads, "reduce_bucket": comp.reduce_bucket(s),
            "gathered": comp.gathered_blocks(s), "activations": act.saved_all_layers(s, in_backward=True),
            "recompute": act.recomputed_layer(s), "temporaries": act.backward_temporaries(s)}


def _optimizer_phase(s: Settings) -> dict[str, int]:
    # torch's foreach AdamW (the CUDA default) makes one temporary the size of the parameters it steps.
    foreach = s.device == "cuda" and s.optimizer == "adamw" and not s.engine.optimizer_sees_flat
    temp = 4 * math.ceil(sum(s.trainable) / (s.world if s.engine.shards_optimizer else 1)) if foreach else 0
    return {"gradients": comp.gradients(s), "temporaries": temp}


def estimate(s: Settings, capacity: int | None = None) -> Plan:
    """The per-device memory plan of settings `s` on devices of `capacity` bytes (None: unknown)."""
    static = _static(s)
    phases = {name: {**static, **fn(s)} for name, fn in
              (("loss", _loss_phase), ("backward", _backward_phase), ("optimizer", _optimizer_phase))}
    notes = []
    if not s.engine.landed:
        notes.append(f"engine {s.engine.name}: modeled on paper; this qtrain cannot run it yet")
    return Plan(s, phases, comp.optimizer_paged(s), capacity, notes)
