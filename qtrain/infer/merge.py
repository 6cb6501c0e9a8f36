"""`qtrain merge`: fold an adapter into its base and write a plain Hugging Face model dir.

Every adapted weight becomes W' = cast(merged), with W dequantized to fp32 and the method's math
(LoRA W + s·B·A, DoRA m·V/‖V‖, (IA)³ row or column scaling, BitFit's bias, diff pruning's delta;
layer freezing's trained blocks replace the base's) done in fp32, so the only rounding is the final
cast to the output dtype. Prompt/prefix tuning and bottleneck adapters change no weight and are
refused before anything loads. W is what inference with
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
from qtrain.models.arch_spec import declare_biases
from qtrain.peft.artifact import read_config
from qtrain.peft.freeze import FreezeBlocks
from qtrain.peft.holder import holders
from qtrain.peft.multi_linear import MultiAdapterLinear
from qtrain.peft.registry import method_of_artifact
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
    """An nn.Linear holding `layer`'s base weight and bias (dequantized) with adapter `adapter` folded in
    by its own math (LoRA, DoRA, (IA)³, BitFit, diff pruning), in fp32 and cast once."""
    if isinstance(layer, MultiAdapterLinear):
        base, (weight, bias) = layer.base_layer, layer.dense_merged(adapter)
    else:
        base, weight = layer, dense_weight_fn(layer)(torch.float32)
        bias = None if getattr(layer, "bias", None) is None else layer.bias.detach().float()
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=weight.device, dtype=out_dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(out_dtype))
        if bias is not None:
            out.bias.copy_(bias.to(out_dtype))
    out.requires_grad_(False)
    return out


def fold_adapter(model: nn.Module, adapter: str, out_dtype: torch.dtype) -> int:
    """Make `model` (adapter `adapter` active) a plain dense model: every MultiAdapterLinear and NF4Linear becomes
    a dense merged nn.Linear, the adapter holders leave (layer freezing's blocks stay swapped in), every parameter
    is cast to `out_dtype`. Returns how many layers or blocks carry the adapter.

    A bias the adapter gave a bias-less linear (BitFit) is declared in the config (architecture spec's
    bias flags), or refused where the family's config cannot declare one. Buffers keep their dtype
    (rotary tables are recomputed in fp32 on load anyway); parameters are cast in place so tied
    embeddings stay tied.
    """
    merged = sum(len(h.adapters[adapter]) for h in holders(model).values()
                 if isinstance(h, FreezeBlocks) and adapter in h.adapters)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (MultiAdapterLinear, NF4Linear))]
    wrappers = {n for n, m in layers if isinstance(m, MultiAdapterLinear)}
    gained = []
    for name, layer in layers:
        if name.rpartition(".")[0] in wrappers:
            continue  # the base of a wrapper, replaced with the wrapper
        merged += int(isinstance(layer, MultiAdapterLinear) and adapter in layer.adapters)
        dense = dense_linear(layer, out_dtype, adapter)
        if dense.bias is not None and getattr(getattr(layer, "base_layer", layer), "bias", None) is None:
            gained.append(name)
        model.set_submodule(name, dense)
    declare_biases(model, gained)
    for name in [n for n, h in holders(model).items() if not isinstance(h, MultiAdapterLinear)]:
        parent, _, leaf = name.rpartition(".")
        delattr(model.get_submodule(parent) if parent else model, leaf)
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
    method = method_of_artifact(read_config(opts.adapter), str(Path(opts.adapter) / "adapter_config.json"))
    if method.merge_refusal:
        raise ConfigError(f"--adapter {opts.adapter}: a {method.name} adapter cannot be merged: {method.merge_refusal}")
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
