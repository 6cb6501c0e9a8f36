"""The checkpoint protocol's pieces: commit/verify/prune, the state tree, safe-loading rules."""

import json
import re
from pathlib import Path

import pytest
import torch

from qtrain.checkpoint import store
from qtrain.checkpoint.resume import find_resume_point
from qtrain.checkpoint.tree import flatten, unflatten
from qtrain.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


def _save(out: Path, step: int, payload: bytes = b"x") -> Path:
    tmp = store.begin(out, step)
    (tmp / "a.bin").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.json").write_text("{}")
    return store.commit(tmp, step, {"world_size": 1})


def test_commit_writes_manifest_marker_and_pointer(tmp_path):
    ckpt = _save(tmp_path, 5)
    assert ckpt.name == "step-5" and (ckpt / store.MARKER).is_file()
    manifest = store.verify(ckpt, ["a.bin", "sub/b.json"])
    assert set(manifest["files"]) == {"a.bin", "sub/b.json"} and manifest["step"] == 5
    assert store.read_pointer(tmp_path) == "step-5"
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_verify_names_the_damaged_file(tmp_path):
    ckpt = _save(tmp_path, 1, b"hello world")
    (ckpt / "a.bin").write_bytes(b"hello worle")
    with pytest.raises(CheckpointError, match="a.bin"):
        store.verify(ckpt)
    with pytest.raises(CheckpointError, match="rng-rank-1"):
        store.verify(_save(tmp_path, 2), ["rng-rank-1.safetensors"])


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    store.prune(tmp_path, 2)
    assert [p.name for _, p in store.committed_steps(tmp_path)] == ["step-4", "step-3"]


def test_resume_never_and_fresh_dirs_start_over(tmp_path):
    assert find_resume_point(tmp_path, "never", []) is None
    assert find_resume_point(tmp_path, "auto", []) is None


def test_resume_auto_skips_uncommitted_and_warns(tmp_path):
    _save(tmp_path, 1)
    (_save(tmp_path, 2) / store.MARKER).unlink()
    warnings = []
    assert find_resume_point(tmp_path, "auto", [], warnings.append).name == "step-1"
    assert any("step-2" in w for w in warnings)


def test_state_tree_round_trips_nested_optimizer_like_state():
    state = {"state": {0: {"step": torch.tensor(3.0), "q": {"absmax": torch.ones(4), "n": 7}}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None}]}
    tree, tensors = flatten(state, "opt")
    back = unflatten(json.loads(json.dumps(tree)), tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["state"][0]["q"]["absmax"], torch.ones(4)) and back["state"][0]["q"]["n"] == 7
    with pytest.raises(TypeError, match="opt.bad"):
        flatten({"bad": object()}, "opt")


def test_no_unsafe_deserialization_in_the_package():
    """Tensors load through safetensors; any torch.load must pass weights_only=True; YAML is safe."""
    offenders = []
    for path in list((REPO / "qtrain").rglob("*.py")) + list((REPO / "kernels").rglob("*.py")):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
        if re.search(r"\bpickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|trust_remote_code=True", text):
            offenders.append(f"{path}: unsafe loader")
    assert not offenders, offenders
