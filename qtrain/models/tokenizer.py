"""Load a tokenizer from a local directory; refuse ones a trainer cannot batch with."""

from __future__ import annotations

from pathlib import Path

from qtrain.errors import ConfigError


def load_tokenizer(path: str, key: str = "model.tokenizer", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"{key}: tokenizer dir not found: {path} (give a local dir with tokenizer.json "
                          "or tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad dir
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {exc}") from None
    if tok.pad_token_id is None:
        raise ConfigError(f"{key}: the tokenizer in {path} has no pad token; add one and save it, e.g. "
                          "tok.pad_token = tok.eos_token; tok.save_pretrained(dir)")
    if tok.eos_token_id is None:
        raise ConfigError(f"{key}: the tokenizer in {path} has no eos token; set eos_token in its tokenizer_config.json")
    return tok
