"""Value checks on a typed recipe: ranges and combinations. Returns problems, raises nothing."""

from __future__ import annotations

import re

from qtrain.config.methods import METHOD_RULES
from qtrain.config.peft_checks import check_peft, check_variant
from qtrain.config.peft_checks import positive as _positive
from qtrain.config.schema import Recipe

_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_values(r: Recipe) -> list[str]:
    p: list[str] = []
    if not r.output_dir:
        p.append("output_dir: required (a directory for the adapter, metrics and checkpoints)")
    m = r.model
    if (m.path is None) == (m.from_config is None):
        p.append("model: set exactly one of model.path (local HF model dir) or model.from_config (a transformers config)")
    if m.from_config is not None:
        if "model_type" not in m.from_config:
            p.append("model.from_config.model_type: required (e.g. llama)")
        if m.tokenizer is None:
            p.append("model.tokenizer: required with model.from_config (a local tokenizer dir)")
    if r.quant.blocksize not in _BLOCKSIZES:
        p.append(f"quant.blocksize: must be one of {_BLOCKSIZES}, got {r.quant.blocksize}")
    p.extend(check_peft(r))
    c = r.compare
    if not c.variants:
        p.append("compare.variants: empty list; name base and some methods, e.g. [base, lora, ia3, prompt_tuning]")
    elif len(set(c.variants)) != len(c.variants):
        p.append(f"compare.variants: {c.variants} names a variant twice")
    for v in c.variants:
        p.extend(check_variant(v))
    if c.full_lr is not None:
        _positive(p, "compare.full_lr", c.full_lr)
    for name, lr in c.method_lr.items():
        if name not in METHOD_RULES:
            p.append(f"compare.method_lr.{name}: not a method (methods: {', '.join(METHOD_RULES)})")
        elif isinstance(lr, float):  # (a value of the wrong type is already reported)
            _positive(p, f"compare.method_lr.{name}", lr)
    if c.max_gen_rows is not None:
        _positive(p, "compare.max_gen_rows", c.max_gen_rows, allow_zero=True)
    _positive(p, "compare.max_new_tokens", c.max_new_tokens)
    d = r.data
    _check_data_sources(p, r)
    if d.max_len < 8:
        p.append(f"data.max_len: must be >= 8, got {d.max_len}")
    if not 0.0 <= d.eval_split < 1.0:
        p.append(f"data.eval_split: must be in [0, 1), got {d.eval_split}")
    t = r.train
    for key in ("micro_batch_size", "grad_accum", "max_steps"):
        _positive(p, f"train.{key}", getattr(t, key))
    _positive(p, "train.lr", t.lr)
    _positive(p, "train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive(p, "train.weight_decay", t.weight_decay, allow_zero=True)
    _positive(p, "train.eval_every_steps", t.eval_every_steps, allow_zero=True)
    if t.grad_clip is not None:
        _positive(p, "train.grad_clip", t.grad_clip)
    if t.eval_batches is not None:
        _positive(p, "train.eval_batches", t.eval_batches)
    if t.num_threads is not None:
        _positive(p, "train.num_threads", t.num_threads)
    _positive(p, "checkpoint.every_steps", r.checkpoint.every_steps, allow_zero=True)
    _positive(p, "checkpoint.keep", r.checkpoint.keep)
    _positive(p, "logging.every_steps", r.logging.every_steps)
    if not re.fullmatch(r"auto|never|step-\d+", r.checkpoint.resume):
        p.append(f"checkpoint.resume: must be auto, never or a checkpoint name like step-200; got {r.checkpoint.resume!r}")
    _positive(p, "train.max_nonfinite_in_row", t.max_nonfinite_in_row)
    if r.distributed.engine == "deepspeed" and r.distributed.deepspeed_config is None:
        p.append("distributed.engine: 'deepspeed' needs distributed.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
    if r.distributed.engine in ("plain", "ddp", "fsdp") and r.distributed.deepspeed_config is not None:
        p.append(f"distributed.deepspeed_config: set, but distributed.engine is {r.distributed.engine!r}; "
                 "use 'deepspeed' (or 'auto') or remove the key")
    if r.distributed.engine == "fsdp" and t.optimizer != "adamw":
        # FSDP2's parameters are DTensor shards: bitsandbytes' 8-bit and paged optimizers do not run on
        # them, and FSDP2 cannot page optimizer state.
        p.append(f"train.optimizer: {t.optimizer!r} is not supported under distributed.engine: fsdp (bitsandbytes' "
                 "8-bit and paged optimizers do not run on FSDP's sharded parameters); use adamw, whose state "
                 "FSDP shards across processes")
    _positive(p, "distributed.timeout_s", r.distributed.timeout_s)
    return p


def _check_data_sources(p: list[str], r: Recipe) -> None:
    """data.path xor data.mix, well-formed paths and weights, and what streaming needs."""
    d = r.data
    if d.mix is not None and d.path:
        p.append("data.mix: set together with data.path; use data.path for one source or data.mix for several, "
                 "not both")
    elif d.mix is None and not d.path:
        p.append("data.path: required (a local .jsonl/.json/.csv/.parquet file, a glob, or a list of them; "
                 "or data.mix for weighted sources)")
    if isinstance(d.path, list) and any(not x for x in d.path):
        p.append(f"data.path: every entry must be a file or glob, got {d.path!r}")
    if d.mix is not None:
        if not d.mix:
            p.append("data.mix: empty list; give [{path: FILE, weight: 1.0}, ...] or use data.path")
        for i, source in enumerate(d.mix):
            if not source.path or (isinstance(source.path, list) and not all(source.path)):
                p.append(f"data.mix[{i}].path: required (a file, a glob, or a list of them)")
            _positive(p, f"data.mix[{i}].weight", source.weight)
    if d.num_proc is not None:
        _positive(p, "data.num_proc", d.num_proc)
    if d.streaming and d.eval_split > 0 and not d.eval_path:
        p.append(f"data.eval_split: {d.eval_split} cannot be held out of a stream (its length is unknown); "
                 "with data.streaming set data.eval_path to a held-out file, or data.eval_split: 0")
