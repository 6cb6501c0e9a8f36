"""`qtrain merge`: fold an adapter into its base and write a plain Hugging Face model dir.

Every adapted weight becomes W' = cast(W + s·B·A), with W dequantized to fp32 and the sum taken
in fp32, so the only rounding is the final cast to the output dtype. W is what inference with
the adapter uses: the NF4 base dequantized (default, as training saw it; the NF4 bytes depend
on the dtype the base was loaded in, `--base-dtype`, so it must match the recipe's
`model.dtype`) or the original weights (`--no-quant`). Every other 4-bit layer is dequantized
too, so the result is a dense model `AutoModelForCausalLM.from_pretrained` (encoder-decoder bases:
`AutoModelForSeq2SeqLM`) loads without qtrain.

Before writing, the merged model and base + adapter run the same probe text (an encoder-decoder
model reads it in the encoder and again as its decoder input); the largest logit difference is
printed and kept in `qtrain_merge.json` beside the weights.

Merging back into 4-bit is refused: requantizing W' to NF4 adds a second rounding (of the order
of NF4's own error) on top of the one the adapter was trained against, and the result is no
smaller than keeping the NF4 base plus the adapter, which `qtrain generate` runs directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qtrain.checkpoint.atomic import atomic_dir
from qtrain.errors import ConfigError
from qtrain.infer.decode import model_device
from qtrain.infer.load import DTYPES, BaseOptions, load_with_adapters
from qtrain.infer.multi_lora import MultiLoRALinear
from qtrain.infer.prompts import encode_prompt
from qtrain.models.arch import decoder_start_id, model_is_encoder_decoder
from qtrain.quant.linear import NF4Linear, dense_weight_fn

MARKER = "qtrain_merge.json"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9"
NF4_REFUSAL = ("--dtype nf4: merging into a 4-bit model is refused. Requantizing base+adapter to NF4 rounds every "
               "weight a second time, on top of the NF4 error the adapter was trained against, and the file is "
               "no smaller than the NF4 base plus the adapter. Keep the adapter and run it on the 4-bit base "
               "(`qtrain generate --adapter DIR`), or merge to --dtype bf16 and quantize that at load time")


@dataclass
class MergeOptions:
    adapter: str
    out: str
    dtype: str = "bf16"
    base: Optional[str] = None
    base_options: BaseOptions = field(default_factory=BaseOptions)
    max_shard_size: str = "2GB"


def dense_linear(layer: nn.Module, out_dtype: torch.dtype, adapter: Optional[str]) -> nn.Linear:
    """An nn.Linear holding `layer`'s base weight (dequantized) plus, if named, its adapter's s·B·A."""
    base = layer.base_layer if isinstance(layer, MultiLoRALinear) else layer
    weight = dense_weight_fn(base)(torch.float32).clone()
    if adapter is not None and isinstance(layer, MultiLoRALinear) and adapter in layer.adapters:
        weight += layer.delta(adapter).to(weight.device)
    bias = getattr(base, "bias", None)
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device, dtype=out_dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(out_dtype))
        if bias is not None:
            out.bias.copy_(bias.to(out_dtype))
    out.requires_grad_(False)
    return out


def fold_adapter(model: nn.Module, adapter: str, out_dtype: torch.dtype) -> int:
    """Replace every MultiLoRALinear and NF4Linear by a dense merged nn.Linear and cast every parameter to
    `out_dtype`; returns how many layers got the adapter.

    Buffers keep their dtype (rotary tables are recomputed in fp32 on load anyway); parameters are
    cast in place so tied embeddings stay tied.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (MultiLoRALinear, NF4Linear))]
    wrappers = {n for n, m in layers if isinstance(m, MultiLoRALinear)}
    merged = 0
    for name, layer in layers:
        if name.rpartition(".")[0] in wrappers:
            continue  # the base of a wrapper, replaced with the wrapper
        merged += int(isinstance(layer, MultiLoRALinear) and adapter in layer.adapters)
        model.set_submodule(name, dense_linear(layer, out_dtype, adapter))
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != out_dtype:
                p.data = p.data.to(out_dtype)
    return merged


@torch.inference_mode()
def probe_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids], device=model_device(model))
    if model_is_encoder_decoder(model):
        start = torch.full_like(x[:, :1], decoder_start_id(model))
        return model(input_ids=x, decoder_input_ids=torch.cat([start, x[:, :-1]], dim=1)).logits.float()
    return model(input_ids=x).logits.float()


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ConfigError(f"--out {out}: exists and is not a merge qtrain wrote; choose a new or empty dir")


def merge_to_dir(opts: MergeOptions) -> dict:
    """Write the merged model to `opts.out`; returns the report also saved as qtrain_merge.json."""
    if opts.dtype == "nf4":
        raise ConfigError(NF4_REFUSAL)
    if opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype {opts.dtype}: expected bf16, fp16 or fp32")
    out = Path(opts.out)
    _check_out_dir(out)
    out_dtype = DTYPES[opts.dtype]
    model, aset, tokenizer, base_dir = load_with_adapters({"default": opts.adapter}, opts.base, opts.base_options)
    probe = encode_prompt(tokenizer, PROBE_TEXT, model_is_encoder_decoder(model))
    reference = probe_logits(model, probe)
    n_merged = fold_adapter(model, "default", out_dtype)
    diff = (probe_logits(model, probe) - reference).abs()
    report = {
        "adapter": str(Path(opts.adapter).resolve()), "base": str(Path(base_dir).resolve()),
        "base_weights": "nf4-dequantized" if opts.base_options.quant is not None else "original",
        "base_dtype": str(opts.base_options.dtype).replace("torch.", ""), "dtype": str(out_dtype).replace("torch.", ""),
        "merged_layers": n_merged, "probe_tokens": len(probe),
        "probe_max_abs_logit_diff": float(diff.max()), "probe_mean_abs_logit_diff": float(diff.mean()),
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=opts.max_shard_size)
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    return report
