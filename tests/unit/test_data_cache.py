"""The data cache: a hit gives the fresh build's batches byte for byte; any key input rebuilds; damage rebuilds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qtrain.config.schema import DataConfig
from qtrain.data import build_datasets, collate
from qtrain.models.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "data" / "quickstart" / "tokenizer"


def _write(path: Path, n: int) -> str:
    rows = [{"prompt": f"Row {i}:\n", "response": f"answer {i}", "text": f"text {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(path=path, **{"max_len": 24, "eval_split": 0.1, **kw})


def _batches(bundle, n: int = 6) -> list[dict[str, torch.Tensor]]:
    stream = bundle.train_stream(4, seed=0)
    out = [collate(next(stream), pad_id=0) for _ in range(n)]
    return out + [collate(bundle.eval[i:i + 4], pad_id=0) for i in range(0, len(bundle.eval), 4)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.mark.parametrize("packing", [True, False])
def test_a_cache_hit_gives_the_fresh_builds_batches_byte_for_byte(tmp_path, tok, packing):
    path = _write(tmp_path / "d.jsonl", 80)
    fresh = build_datasets(_cfg(path, packing=packing), tok, seed=0)  # no cache: private temporary build
    built = build_datasets(_cfg(path, packing=packing), tok, seed=0, cache_dir=tmp_path / "cache")
    cached = build_datasets(_cfg(path, packing=packing), tok, seed=0, cache_dir=tmp_path / "cache")
    assert (fresh.cache_status, built.cache_status, cached.cache_status) == ("temporary", "built", "cached")
    assert cached.cache_dir == built.cache_dir and cached.status_line() == f"data: cached ({built.cache_dir})"
    assert _same(_batches(built), _batches(fresh)) and _same(_batches(cached), _batches(fresh))
    assert vars(cached.report) == vars(fresh.report)


def _variants(tmp_path: Path, tok):
    """Each changes one input of the cache key; the file variant keeps size and name."""
    tok_dir = tmp_path / "tok2"
    shutil.copytree(TOKENIZER_DIR, tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages }}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return {
        "tokenizer": lambda path: (_cfg(path), load_tokenizer(str(tok_dir))),
        "max_len": lambda path: (_cfg(path, max_len=25), tok),
        "format": lambda path: (_cfg(path, format="text"), tok),
        "overlong": lambda path: (_cfg(path, overlong="drop"), tok),
        "packing": lambda path: (_cfg(path, packing=False), tok),
        "eval_split": lambda path: (_cfg(path, eval_split=0.2), tok),
        "file content": lambda path: (_cfg(path), tok),  # the loop rewrites the file
    }


def test_every_key_input_rebuilds_and_an_unchanged_one_does_not(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", 80)
    cache = tmp_path / "cache"
    base = build_datasets(_cfg(path), tok, seed=0, cache_dir=cache)
    size = Path(path).stat().st_size
    for name, make in _variants(tmp_path, tok).items():
        _write(Path(path), 80)  # back to the original content before each variant
        cfg, tokenizer = make(path)
        if name == "file content":
            Path(path).write_text(Path(path).read_text().replace("answer 7", "answer 8"))  # same size, new bytes
            assert Path(path).stat().st_size == size
        again = build_datasets(cfg, tokenizer, seed=0, cache_dir=cache)
        assert again.cache_status == "built" and again.cache_dir != base.cache_dir, name
    _write(Path(path), 80)
    assert build_datasets(_cfg(path), tok, seed=1, cache_dir=cache).cache_status == "built"  # seed
    assert build_datasets(_cfg(path), tok, seed=0, cache_dir=cache).cache_status == "cached"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated tokens": lambda entry: _truncate(next(entry.glob("tokens-*.arrow"))),
    "flipped bit in the sequences": lambda entry: _flip(entry / "train.arrow"),
    "missing manifest": lambda entry: (entry / "manifest.json").unlink(),
    "manifest of another version": lambda entry: (entry / "manifest.json").write_text(
        (entry / "manifest.json").read_text().replace('"version": 1', '"version": 0')),
    "missing file": lambda entry: (entry / "eval.arrow").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_or_partial_cache_is_rebuilt_never_used(tmp_path, tok, damage):
    path = _write(tmp_path / "d.jsonl", 80)
    cache = tmp_path / "cache"
    good = build_datasets(_cfg(path), tok, seed=0, cache_dir=cache)
    expected = _batches(good)
    DAMAGE[damage](good.cache_dir)
    # A build killed midway leaves its temporary directory; the next builder clears it.
    (cache / f".tmp-{good.cache_dir.name}-999-dead").mkdir()
    again = build_datasets(_cfg(path), tok, seed=0, cache_dir=cache)
    assert again.cache_status == "built" and again.cache_dir == good.cache_dir
    assert _same(_batches(again), expected)
    assert not list(cache.glob(".tmp-*"))
    assert len((cache / "builds.log").read_text().splitlines()) == 2


def test_rebuild_forces_a_build_of_a_valid_entry(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", 40)
    cache = tmp_path / "cache"
    build_datasets(_cfg(path), tok, seed=0, cache_dir=cache)
    assert build_datasets(_cfg(path, rebuild=True), tok, seed=0, cache_dir=cache).cache_status == "built"


def test_a_read_only_cache_with_a_valid_entry_is_used_and_one_without_is_a_data_error(tmp_path, tok, monkeypatch):
    from qtrain.errors import DataError

    path = _write(tmp_path / "d.jsonl", 40)
    cache = tmp_path / "cache"
    build_datasets(_cfg(path), tok, seed=0, cache_dir=cache)

    def read_only(self, *args, **kwargs):  # what touching a lock file on a read-only filesystem does
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(Path, "touch", read_only)
    assert build_datasets(_cfg(path), tok, seed=0, cache_dir=cache).cache_status == "cached"
    with pytest.raises(DataError, match="data.cache_dir: cannot write to .* no valid entry"):
        build_datasets(_cfg(path, max_len=30), tok, seed=0, cache_dir=cache)


def test_a_cache_dir_that_is_a_file_is_a_data_error(tmp_path, tok):
    from qtrain.errors import DataError

    path = _write(tmp_path / "d.jsonl", 10)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="data.cache_dir"):
        build_datasets(_cfg(path), tok, seed=0, cache_dir=tmp_path / "file")
