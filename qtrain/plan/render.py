"""The plan as a table for people and as JSON for scripts (same numbers, MiB = 2^20 bytes)."""

from __future__ import annotations

import json

from qtrain.plan import activations as act
from qtrain.plan import components as comp
from qtrain.plan.estimate import OVERHEAD_MEASURED, Plan
from qtrain.plan.settings import Settings
from qtrain.plan.verdict import Suggestion

MIB = 2**20
PHASES = {"loss": "loss (forward done, cross-entropy)", "backward": "backward (last layer)",
          "optimizer": "optimizer step"}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _labels(s: Settings) -> dict[str, tuple[str, str]]:
    """component -> (label, note)."""
    sh = s.shape
    quantized = [lin for lin in sh.linears if lin.quantized]
    nq = sum(lin.numel for lin in quantized)
    bits = 8 * sum(comp.nf4_bytes(lin.numel, s.blocksize, s.double_quant) for lin in quantized) / max(1, nq)
    adapter = f"r={s.r} on {len(sh.adapted)} linears, {_params(sum(s.trainable))} params"
    per_layer = _per_layer(s)
    ckpt = (f"{per_layer['checkpointed'] / MIB:,.1f} MiB/layer checkpointed (recompute {s.recompute}), "
            f"{per_layer['not_checkpointed'] / MIB:,.1f} without")
    opt = {"adamw": "two fp32 moments", "paged_adamw": "two fp32 moments"}.get(
        s.optimizer, "8-bit moments + absmax, fp32 under 4096 values")
    return {
        "base_nf4": ("base weights, NF4 + absmax", f"{_params(nq)} params, {bits:.2f} bits each"),
        "base_dense": (f"base weights, {'fp32 (trained)' if s.method == 'full' else s.model_dtype}",
                       f"{_params(sh.dense_params)} params: embeddings, norms, lm_head, unquantized linears"),
        "adapter": ("LoRA adapter, fp32", adapter),
        "optimizer": (f"optimizer state ({s.optimizer})", opt + (", paged part below" if plan_paged(s) else "")),
        "master_copy": ("ZeRO fp32 master partition", f"1/{s.world} of the trainable params"),
        "grad_buckets": ("DDP gradient buckets, fp32", "one copy of the trainable params"),
        "gradients": ("gradients, fp32", "partition" if s.engine.shards_grads else "every trainable param"),
        "reduce_bucket": ("DeepSpeed reduce bucket, fp32", f"reduce_bucket_size {s.engine.reduce_bucket_elems:,}"),
        "gathered": ("gathered parameters (sharded engine)", f"{s.engine.gathered_blocks} decoder blocks whole"),
        "activations": ("activations saved for backward", f"{sh.layers} layers x {s.tokens:,} tokens: {ckpt}"),
        "recompute": ("recomputed layer + its dense weights", "one layer at a time in backward"),
        "temporaries": ("temporaries", "activation grads, a dequantized weight / foreach buffers"),
        "loss": (("fused linear + cross-entropy" if s.fused_ce else "logits + cross-entropy"),
                 f"{s.tokens:,} tokens x {sh.vocab:,} vocab"),
    }


def plan_paged(s: Settings) -> bool:
    return comp.optimizer_paged(s) > 0


def _per_layer(s: Settings) -> dict[str, int]:
    """One decoder layer's saved activations for this micro-batch, checkpointed or not."""
    return {"checkpointed": (act.stream_bytes(s) * s.shape.hidden + act.kept_per_token(s)) * s.tokens,
            "not_checkpointed": act.layer_per_token(s) * s.tokens}


def to_json(plan: Plan, sugg: list[Suggestion]) -> dict:
    s = plan.settings
    labels = _labels(s)
    peak = plan.phases[plan.peak_phase]
    return {
        "device": s.device, "world_size": s.world, "engine": s.engine.name, "engine_runnable": s.engine.landed,
        "capacity_mib": None if plan.capacity is None else _mib(plan.capacity),
        "model": {"type": s.shape.model_type, "params": s.shape.total_params, "layers": s.shape.layers,
                  "hidden": s.shape.hidden, "vocab": s.shape.vocab},
        "settings": {"method": s.method, "r": s.r, "adapted_linears": len(s.shape.adapted),
                     "trainable_params": sum(s.trainable), "micro_batch_size": s.micro_batch, "max_len": s.max_len,
                     "grad_accum": s.grad_accum, "model_dtype": s.model_dtype, "compute_dtype": s.compute_dtype,
                     "gradient_checkpointing": s.checkpointing, "recompute": s.recompute, "optimizer": s.optimizer,
                     "fused_cross_entropy": s.fused_ce},
        "components": [{"name": k, "label": labels[k][0], "mib": _mib(v)} for k, v in peak.items() if v],
        "activations_per_layer_mib": {k: _mib(v) for k, v in _per_layer(s).items()},
        "phases_mib": {k: _mib(sum(v.values())) for k, v in plan.phases.items()},
        "peak_phase": plan.peak_phase, "peak_mib": _mib(plan.peak), "paged_optimizer_mib": _mib(plan.paged),
        "overhead_mib": _mib(plan.overhead), "overhead_measured": OVERHEAD_MEASURED[s.device],
        "needed_mib": _mib(plan.needed), "fits": plan.fits,
        "comparable_peak_mib": _mib(plan.comparable_peak), "notes": plan.notes,
        "suggestions": [{"change": x.change, "overrides": list(x.overrides), "flags": list(x.flags),
                         "needed_mib": _mib(x.needed), "runnable": x.runnable} for x in sugg],
    }


def to_json_text(plan: Plan, sugg: list[Suggestion]) -> str:
    return json.dumps(to_json(plan, sugg), indent=2)


def _head(plan: Plan, source: str) -> list[str]:
    s = plan.settings
    cap = "" if plan.capacity is None else f", {plan.capacity / 2**30:.1f} GiB each"
    what = "full fine-tuning" if s.method == "full" else f"LoRA r={s.r} on {len(s.shape.adapted)} linears"
    ckpt = f"checkpointing (recompute {s.recompute})" if s.checkpointing else "no checkpointing"
    return [f"qtrain plan: {source} on {s.world} x {s.device}{cap}, engine {s.engine.name}",
            f"  model {s.shape.model_type}: {_params(s.shape.total_params)} params, {s.shape.layers} layers, "
            f"hidden {s.shape.hidden}, vocab {s.shape.vocab:,}",
            f"  {what} ({_params(sum(s.trainable))} trainable); micro-batch {s.micro_batch} x {s.max_len} tokens, "
            f"grad_accum {s.grad_accum}; compute {s.compute_dtype}; {ckpt}; {s.optimizer}"
            + ("; fused cross-entropy" if s.fused_ce else ""), ""]


def _verdict(plan: Plan) -> str:
    if plan.capacity is None:
        return "  no device memory given: pass --gpu-mem (e.g. 24GiB) for a verdict"
    room = plan.capacity - plan.needed
    if room >= 0:
        return f"  fits: {room / MIB:,.0f} MiB to spare of {plan.capacity / MIB:,.0f} MiB per device"
    return f"  does not fit: {-room / MIB:,.0f} MiB over {plan.capacity / MIB:,.0f} MiB per device"


def to_text(plan: Plan, sugg: list[Suggestion], source: str) -> str:
    s = plan.settings
    labels = _labels(s)
    lines = _head(plan, source)
    lines.append(f"  {'per device, at the peak':<42} {'MiB':>10}  note")
    for key, value in plan.phases[plan.peak_phase].items():
        if value:
            label, note = labels[key]
            lines.append(f"  {label:<42} {value / MIB:>10,.1f}  {note}")
    if plan.paged:
        lines.append(f"  {'(paged optimizer state, evictable)':<42} {plan.paged / MIB:>10,.1f}  unified memory, "
                     "not counted: the driver moves it to host memory under pressure")
    others = ", ".join(f"{PHASES[p].split(' (')[0]} {sum(v.values()) / MIB:,.0f}"
                       for p, v in plan.phases.items() if p != plan.peak_phase)
    measured = "measured" if OVERHEAD_MEASURED[s.device] else "assumed, not yet measured"
    lines += [f"  {'peak: ' + PHASES[plan.peak_phase]:<42} {plan.peak / MIB:>10,.1f}  other phases: {others}",
              f"  {'+ runtime overhead (' + s.device + ')':<42} {plan.overhead / MIB:>10,.1f}  {measured}",
              f"  {'= needed per device':<42} {plan.needed / MIB:>10,.1f}", "", _verdict(plan)]
    lines += [f"  note: {n}" for n in plan.notes]
    if sugg:
        lines.append("  nearest settings that fit:")
        for x in sugg:
            tail = f"  [{x.command_line()}]" if x.command_line() else ""
            soon = "" if x.runnable else " (engine not runnable yet)"
            lines.append(f"    - {x.change}: {x.needed / MIB:,.0f} MiB{soon}{tail}")
    elif plan.fits is False:
        lines.append("  no single change or stack of changes the planner knows fits this device")
    return "\n".join(lines)
