"""A directory of built data, keyed by everything that decides it, built once and verified on every use.

Layout under the cache root (`data.cache_dir`):
    <key>/            a committed entry: the builder's files + manifest.json (sizes and xxh3 checksums)
    <key>.lock        flock'ed: exclusive while building, shared while verifying and opening
    .tmp-<key>-...    a build in progress (or one killed midway; removed by the next builder)
    builds.log        one line per build: when, where, which key

The build writes into a temporary directory and renames it to `<key>` only after every file and
the manifest are on disk, so a crash leaves no half entry. Every open re-checks sizes and
checksums, so a truncated or altered file is found and the entry rebuilt, never used. Whichever
process takes the exclusive lock builds; the others wait on the lock and then open the same
files: one build per cache directory, be it node-local or on a shared filesystem (flock works on
local filesystems and NFSv4; Lustre needs the `flock` mount option).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from qtrain.errors import DataError

# Bump when what a build writes (or how it reads it back) changes: old entries are then ignored.
DATA_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
T = TypeVar("T")


def cache_key(inputs: dict[str, Any]) -> str:
    """A short stable digest of the JSON of `inputs` (keys sorted)."""
    import xxhash

    text = json.dumps({"version": DATA_FORMAT_VERSION, **inputs}, sort_keys=True)
    return xxhash.xxh3_128_hexdigest(text.encode())[:24]


def file_digest(path: str | Path) -> str:
    """xxh3-128 of a file's bytes (GB/s: cheap next to reading the file at all)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """What in a tokenizer decides the ids: its full serialized model (vocab, merges, normalizer,
    added tokens) for a fast tokenizer, the vocab for a slow one, plus the special ids and the
    chat template the formats use."""
    import xxhash

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, getattr(tokenizer, "chat_template", None)], default=str)
    return xxhash.xxh3_128_hexdigest((body + extra).encode())


def open_or_build(root: Path, key: str, build: Callable[[Path], dict[str, Any]],
                  use: Callable[[Path, dict[str, Any]], T], *, rebuild: bool = False,
                  on_wait: Callable[[], None] | None = None) -> tuple[T, str]:
    """`use(entry, manifest)` of the committed entry for `key`, building it first if needed.

    Args:
        root: the cache directory.
        key: from `cache_key`; names the entry.
        build: writes the entry's files into the directory it is given and returns the
            manifest's content (anything JSON); checksums are added here.
        use: opens the entry (called under the lock, so the files cannot be replaced meanwhile).
        rebuild: build again even if a valid entry exists -- unless it was committed after this
            call began (another rank of the same launch rebuilt it while this one waited).
        on_wait: called once if another process holds the lock (it is building).

    Returns:
        (what `use` returned, "cached" or "built").
    """
    asked_at = time.time()
    entry, lock = root / key, root / f"{key}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as exc:
        # A read-only cache (built elsewhere, shared by an administrator) is used as it is.
        manifest = None if rebuild else verified_manifest(entry, key)
        if manifest is not None:
            return use(entry, manifest), "cached"
        raise DataError(f"data.cache_dir: cannot write to {root} ({exc.strerror}) and it holds no valid "
                        "entry for this data; set data.cache_dir to a writable directory") from None
    if not rebuild:
        with _flock(lock, exclusive=False, on_wait=on_wait):
            manifest = verified_manifest(entry, key)
            if manifest is not None:
                return use(entry, manifest), "cached"
    with _flock(lock, exclusive=True, on_wait=on_wait):
        manifest = verified_manifest(entry, key)
        if manifest is not None and not (rebuild and manifest["committed_at"] < asked_at):
            return use(entry, manifest), "cached"
        _clear(root, key)
        manifest = _build_committed(root, key, build)
        return use(entry, manifest), "built"


def verified_manifest(entry: Path, key: str) -> dict[str, Any] | None:
    """The entry's manifest if it is complete and intact (every file's size and checksum), else None."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("version") != DATA_FORMAT_VERSION or manifest.get("key") != key:
            return None
        for name, meta in manifest["files"].items():
            path = entry / name
            if path.stat().st_size != meta["size"] or file_digest(path) != meta["xxh3"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_committed(root: Path, key: str, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        content = build(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {**content, "version": DATA_FORMAT_VERSION, "key": key, "committed_at": time.time(),
                    "built_by": {"host": socket.gethostname(), "pid": os.getpid()},
                    "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "xxh3": file_digest(p)}
                              for p in files}}
        for p in files:
            _fsync(p)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync(tmp / MANIFEST)
        os.rename(tmp, root / key)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with open(root / "builds.log", "a") as log:
        log.write(json.dumps({"key": key, "at": manifest["committed_at"], **manifest["built_by"]}) + "\n")
    return manifest


def _clear(root: Path, key: str) -> None:
    """Under the exclusive lock: remove this key's invalid entry and builds that died midway."""
    for stale in [root / key, *root.glob(f".tmp-{key}-*")]:
        if stale.exists():
            shutil.rmtree(stale, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flock(path: Path, *, exclusive: bool, on_wait: Callable[[], None] | None) -> Iterator[None]:
    """flock `path` (created if missing); the kernel drops it if this process dies."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
