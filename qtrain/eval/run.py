"""`qtrain eval RECIPE`: eval loss/perplexity and, for instruction/summarization data, ROUGE.

Decoder-only and encoder-decoder (T5 family) bases alike: the data, the loss positions and the
generation follow the base's architecture (see qtrain.models.arch).

The base is the recipe's (loaded as the recipe trains it: same dtype, quantization, autocast);
the adapter is `--adapter DIR`, or the run's own `<output_dir>/adapter`, or none with
`--no-adapter`. Writes `eval.json` and `eval_generations.jsonl` to `--out-dir` (default: the
recipe's output_dir).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qtrain.checkpoint.atomic import atomic_write_text
from qtrain.config.schema import Recipe
from qtrain.data import build_datasets, data_cache_dir
from qtrain.distributed.env import read_env
from qtrain.errors import CheckpointError, ConfigError, DataError
from qtrain.eval.perplexity import autocast_context, eval_loss
from qtrain.eval.references import References, references
from qtrain.eval.rouge import rouge_scores
from qtrain.infer.adapters import AdapterSet
from qtrain.infer.decode import eos_ids, generate_tokens
from qtrain.infer.prompts import decode_completion
from qtrain.infer.sampling import SamplingConfig
from qtrain.models.arch import is_encoder_decoder
from qtrain.models.load import load_model
from qtrain.models.tokenizer import load_tokenizer
from qtrain.peft.registry import method_for
from qtrain.quant.nf4 import NF4Spec
from qtrain.models.precision import Precision, resolve_precision
from qtrain.train.packing_check import configure_batches
from qtrain.train.setup import autocast_dtype, kernel_backend, resolve_base_dir


@dataclass
class EvalOptions:
    adapter: Optional[str] = None
    no_adapter: bool = False
    out_dir: Optional[str] = None
    batch_size: Optional[int] = None
    generate: bool = True
    max_gen_rows: Optional[int] = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def pick_adapter(recipe: Recipe, opts: EvalOptions) -> Optional[Path]:
    if opts.no_adapter and opts.adapter:
        raise ConfigError("give --adapter DIR or --no-adapter, not both")
    if opts.no_adapter:
        return None
    path = Path(opts.adapter) if opts.adapter else Path(recipe.output_dir) / "adapter"
    if not path.is_dir():
        how = "check --adapter" if opts.adapter else "train first, pass --adapter DIR, or --no-adapter for the base"
        raise CheckpointError(f"adapter dir not found: {path}; {how}")
    return path


def full_model_dir(recipe: Recipe, opts: EvalOptions) -> Optional[Path]:
    """After full fine-tuning the trained model is `<output_dir>/model`; it is evaluated as the base, with no
    adapter. None for adapter methods, or when --adapter/--no-adapter says otherwise."""
    method = method_for(recipe.peft)
    if not method.artifact_is_model or opts.adapter or opts.no_adapter:
        return None
    path = Path(recipe.output_dir) / method.artifact_dir
    if not (path / "config.json").is_file():
        raise CheckpointError(f"fine-tuned model not found: {path} (no config.json); train first, "
                              "or --no-adapter to evaluate the base")
    return path


def build_eval_model(recipe: Recipe, base_dir: Path, adapter: Optional[Path], device: torch.device,
                     precision: Precision) -> nn.Module:
    spec = NF4Spec(recipe.quant.blocksize, recipe.quant.double_quant) if recipe.quant.method == "nf4" else None
    model = load_model(base_dir, precision.dtype, device, spec, kernel_backend(recipe),
                       recipe.model.trust_remote_code)
    adapters = AdapterSet(model)
    if adapter is not None:
        adapters.add_adapter("default", adapter)
        adapters.set_adapter("default")
    model.eval()
    return model


def generate_references(model: nn.Module, tokenizer, refs: References, batch_size: int, cfg: SamplingConfig,
                        device: torch.device, amp: Optional[torch.dtype]) -> list[str]:
    eos, pad = eos_ids(model, tokenizer), tokenizer.pad_token_id
    texts: list[str] = []
    for start in range(0, len(refs.rows), batch_size):
        prompts = [r.prompt_ids for r in refs.rows[start:start + batch_size]]
        with autocast_context(device, amp):
            out = generate_tokens(model, prompts, cfg, eos, pad)
        texts.extend(decode_completion(tokenizer, ids) for ids in out)
        _say(f"eval: generated {len(texts)}/{len(refs.rows)} rows")
    return texts


def evaluate_recipe(recipe: Recipe, opts: EvalOptions, recipe_path: str = "recipe") -> dict:
    """Run the evaluation; returns the report also written to eval.json."""
    t0 = time.perf_counter()
    cfg = opts.sampling.check()
    trained_dir = full_model_dir(recipe, opts)
    adapter = None if trained_dir else pick_adapter(recipe, opts)
    batch = opts.batch_size or recipe.train.micro_batch_size
    if batch < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch}")
    device = read_env().device()
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path,
                               trust_remote_code=recipe.model.trust_remote_code)
    encoder_decoder = is_encoder_decoder(recipe.model)
    data = build_datasets(recipe.data, tokenizer, recipe.seed, encoder_decoder=encoder_decoder,
                          cache_dir=data_cache_dir(recipe.data, recipe.output_dir))
    if not data.eval:
        raise DataError(f"{recipe.data.path or 'data.mix'}: the eval split is empty; "
                        "set data.eval_split > 0 or data.eval_path")
    refs = (references(recipe.data, tokenizer, recipe.seed, encoder_decoder) if opts.generate
            else References([], 0))
    if opts.max_gen_rows is not None:
        refs.rows = refs.rows[: opts.max_gen_rows]
    base_dir = trained_dir or resolve_base_dir(recipe, tokenizer)
    precision = resolve_precision(recipe.model.dtype, device)
    model = build_eval_model(recipe, base_dir, adapter, device, precision)
    amp = autocast_dtype(recipe, precision)
    configure_batches(data, recipe.data.padding_free, model, device, amp)
    loss = eval_loss(model, data.eval, tokenizer.pad_token_id, batch, device, amp, flat=data.flat)
    _say(f"eval: loss {loss.loss:.4f}, perplexity {loss.perplexity:.3f} over {loss.tokens} tokens")
    report = {
        "recipe": recipe_path, "adapter": str(adapter) if adapter else None, "base": str(base_dir),
        "quant": recipe.quant.method, "dtype": recipe.model.dtype,
        "compute_dtype": precision.name, "compute_dtype_reason": precision.reason,
        "eval_loss": loss.loss, "perplexity": loss.perplexity, "eval_tokens": loss.tokens,
        "eval_sequences": loss.sequences, "rouge": None, "generation": None,
    }
    out_dir = Path(opts.out_dir or recipe.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if refs.rows:
        texts = generate_references(model, tokenizer, refs, batch, cfg, device, amp)
        report["rouge"] = rouge_scores(texts, [r.reference for r in refs.rows])
        report["generation"] = {"rows": len(refs.rows), "skipped_long_prompts": refs.skipped_long_prompts,
                                "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                                "file": str(out_dir / "eval_generations.jsonl")}
        lines = [json.dumps({"row": r.row, "prompt": decode_completion(tokenizer, r.prompt_ids),
                             "reference": r.reference, "completion": t}) for r, t in zip(refs.rows, texts)]
        atomic_write_text(out_dir / "eval_generations.jsonl", "\n".join(lines) + "\n")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    return report
