"""Text generation with adapters: the Python API and the body of `qtrain generate`.

    model, adapters, tok, _ = load_with_adapters({"sql": "runs/sql/adapter", "chat": "runs/chat/adapter"})
    texts = generate_text(model, tok, ["Add 2 and 3.", "Say hi."], SamplingConfig(), adapters, ["sql", "chat"])

Each row may name its own adapter (or None for the base); a batch with several adapters runs as
one forward per step (see multi_lora.py).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

import torch
from torch import nn

from qtrain.errors import ConfigError
from qtrain.infer.adapters import AdapterSet
from qtrain.infer.decode import eos_ids, generate_tokens, model_device
from qtrain.infer.load import BaseOptions, load_with_adapters, parse_adapter_args
from qtrain.infer.prompts import PromptRow, decode_completion, encode_prompt, read_prompt_rows
from qtrain.infer.sampling import SamplingConfig
from qtrain.models.arch import model_is_encoder_decoder


class TextStream:
    """Token callback that writes the decoded text as it grows (one row only).

    Decoding the whole sequence each time keeps multi-token characters and tokenizer spacing
    right; a trailing U+FFFD (half of a UTF-8 character) is held back until it completes.
    """

    def __init__(self, tokenizer, write: Callable[[str], object]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = decode_completion(self.tokenizer, self.ids)
        if text.endswith("\ufffd"):
            return
        new = text[len(self.shown):]  # a tokenizer that re-spaces earlier text cannot un-print it
        self.shown = text
        if new:
            self.write(new)


def generate_text(model: nn.Module, tokenizer, prompts: Sequence[str], cfg: SamplingConfig,
                  adapters: Optional[AdapterSet] = None, rows: Optional[Sequence[Optional[str]]] = None,
                  on_token=None, generator: Optional[torch.Generator] = None) -> list[str]:
    """Completions for `prompts` as one batch; `rows[i]` names prompt i's adapter (None: base).

    Without `rows`, the adapter set's active adapter (or whatever the model has) applies to all.
    """
    ids = [encode_prompt(tokenizer, p, model_is_encoder_decoder(model)) for p in prompts]
    eos, pad = eos_ids(model, tokenizer), tokenizer.pad_token_id
    if rows is None or adapters is None:
        out = generate_tokens(model, ids, cfg, eos, pad, on_token, generator)
    else:
        with adapters.use_adapters(list(rows)):
            out = generate_tokens(model, ids, cfg, eos, pad, on_token, generator)
    return [decode_completion(tokenizer, t) for t in out]


@dataclass
class GenerateOptions:
    adapters: list[str]
    prompt: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    use: Optional[str] = None
    batch_size: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    base: Optional[str] = None
    base_options: BaseOptions = field(default_factory=BaseOptions)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_generate(opts: GenerateOptions, stdout: TextIO = sys.stdout) -> int:
    """`qtrain generate`: check every input first, then load, then generate batch by batch."""
    cfg = opts.sampling.check()
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {opts.batch_size}")
    if (opts.prompt is None) == (opts.input is None):
        raise ConfigError("give exactly one of --prompt TEXT or --input FILE.jsonl")
    if opts.prompt is not None and not opts.prompt.strip():
        raise ConfigError("--prompt: the prompt is empty; pass some text")
    named = parse_adapter_args(opts.adapters)
    default = opts.use if opts.use is not None else next(iter(named), None)
    if opts.use is not None and opts.use not in named:
        raise ConfigError(f"--use {opts.use}: no adapter of that name (given: {', '.join(named) or 'none'})")
    rows = ([PromptRow(0, opts.prompt, default)] if opts.prompt is not None
            else read_prompt_rows(opts.input, list(named), default))
    model, aset, tokenizer, base_dir = load_with_adapters(named, opts.base, opts.base_options)
    quant = "nf4" if opts.base_options.quant is not None else str(opts.base_options.dtype).replace("torch.", "")
    _say(f"qtrain: {quant} base from {base_dir}; adapters: "
         + ", ".join(f"{n}={p}" for n, p in named.items()) + f"; {len(rows)} prompt(s)")
    generator = torch.Generator(device=model_device(model)).manual_seed(cfg.seed)
    if opts.prompt is not None:
        stream = TextStream(tokenizer, lambda s: (stdout.write(s), stdout.flush()))
        [text] = generate_text(model, tokenizer, [rows[0].prompt], cfg, aset, [rows[0].adapter], stream, generator)
        stdout.write("\n")
        if opts.output:
            _write_rows(Path(opts.output), [(rows[0], text)])
        return 0
    sink = open(opts.output, "w", encoding="utf-8") if opts.output else stdout
    try:
        for start in range(0, len(rows), opts.batch_size):
            batch = rows[start:start + opts.batch_size]
            texts = generate_text(model, tokenizer, [r.prompt for r in batch], cfg, aset,
                                  [r.adapter for r in batch], None, generator)
            for row, text in zip(batch, texts):
                sink.write(json.dumps({"prompt": row.prompt, "completion": text, "adapter": row.adapter}) + "\n")
            sink.flush()
            if opts.output:
                _say(f"generate: {min(start + opts.batch_size, len(rows))}/{len(rows)} rows")
    finally:
        if sink is not stdout:
            sink.close()
    return 0


def _write_rows(path: Path, rows: list[tuple[PromptRow, str]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row, text in rows:
            fh.write(json.dumps({"prompt": row.prompt, "completion": text, "adapter": row.adapter}) + "\n")
