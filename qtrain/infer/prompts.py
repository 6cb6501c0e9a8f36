"""Prompts in and completions out: the `--input` JSONL reader and prompt/completion (de)tokenization.

An input row is `{"prompt": "..."}`, optionally with `"adapter": "NAME"` (one of the loaded
adapter names) or `"adapter": null` (the base alone); without the key a row uses the default
adapter. A prompt is encoded as training encoded an instruction prompt: BOS (when the
tokenizer has one) + the text, with no other special tokens; for an encoder-decoder model (T5
family), the encoder's input as training built it: the text + EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from qtrain.errors import DataError

_DEFAULT = object()


@dataclass
class PromptRow:
    line: int                 # 1-based line number in the input file (0 for --prompt)
    prompt: str
    adapter: Optional[str]    # None = base alone


def encode_prompt(tokenizer, text: str, encoder_decoder: bool = False) -> list[int]:
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if encoder_decoder:
        return ids + [tokenizer.eos_token_id]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([] if bos is None else [bos]) + ids


def decode_completion(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def read_prompt_rows(path: str | Path, adapters: Sequence[str], default: Optional[str]) -> list[PromptRow]:
    """Every row of a JSONL prompt file; DataError naming the file, line and fix for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check --input")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({exc}); --input takes a .jsonl file") from None
    rows = [_parse(path, n, line, adapters, default) for n, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty); write one JSON object per line, "
                        'e.g. {"prompt": "Add 2 and 3."}')
    return rows


def _parse(path: Path, n: int, line: str, adapters: Sequence[str], default: Optional[str]) -> PromptRow:
    where = f"{path}, line {n}"
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.args[0] if exc.args else exc}); each line must be one "
                        'object like {"prompt": "..."}') from None
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object like {{"prompt": "..."}}, got {type(row).__name__}')
    prompt = row.get("prompt")
    if "prompt" not in row:
        present = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where}: field 'prompt' is missing (fields present: {present}); give every row a prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        what = "is empty" if isinstance(prompt, str) else f"must be a string, got {type(prompt).__name__}"
        raise DataError(f"{where}: field 'prompt' {what}; give every row a non-empty text prompt")
    adapter = row.get("adapter", _DEFAULT)
    if adapter is _DEFAULT:
        adapter = default
    elif adapter is not None and adapter not in adapters:
        loaded = ", ".join(adapters) or "none"
        raise DataError(f"{where}: adapter {adapter!r} is not loaded (loaded: {loaded}); add --adapter "
                        f"{adapter}=DIR or fix the row (null = the base model alone)")
    return PromptRow(n, prompt, adapter)
