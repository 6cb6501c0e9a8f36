"""The real CLI, once per method family whose mechanism differs, on tiny fp32 runs:

- DDP (2 gloo ranks, micro-batch 2) trains exactly like one process with micro-batch 4 (and, for
  diff pruning, whose penalty and gates are the most particular, so does DeepSpeed ZeRO-2);
- a SIGKILLed run resumes bit-exactly (where the checkpoint holds more than the artifact).

Families: linear-layer ((IA)³: the LoRA dispatch point's sibling function), sequence (prefix tuning
with gradient checkpointing: a read-only prefix cache, the MLP state beside the folded artifact),
additive (compacter beside the FFN: a forward hook, rules shared by every adapter), selective (diff pruning:
sampled gates, a penalty once per step, dense state beside the sparse artifact). LoRA and full
fine-tuning have their own tests (test_distributed.py, test_reliability.py, test_full_finetune.py);
every method's resume is also checked in-process (tests/unit/test_method_properties.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel_runs import losses, run_ddp, run_ds, run_single
from tiers import EXTENDED, extended_but

pytestmark = [pytest.mark.slow]
FAMILIES = {
    "ia3": ["peft.method=ia3"],
    "prefix_tuning": ["peft.method=prefix_tuning", "peft.num_virtual_tokens=3", "train.gradient_checkpointing=true"],
    "compacter": ["peft.method=compacter", "peft.reduction_factor=8", "peft.placement=parallel"],
    "diff_pruning": ["peft.method=diff_pruning", "peft.target_sparsity=0.5", "peft.l0_weight=5.0"],
}
COMMON = ["data.packing=false", "train.lr=1e-2", "train.deterministic=true"]
STATE = {"prefix_tuning": "prefix_state.safetensors", "diff_pruning": "diff_state.safetensors"}


def _state(run: Path, method: str) -> dict[str, torch.Tensor]:
    """What a step-6 checkpoint holds of the method: its dense training state, or its adapter."""
    ckpt = run / "checkpoints" / "step-6"
    return load_file(str(ckpt / STATE.get(method, "adapter/adapter_model.safetensors")))


class _Singles(dict):
    """One-process runs per method, made the first time a test asks for one (a tier may need few)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, method: str) -> Path:
        out = self.root / method / "single"
        proc = run_single(out, *COMMON, *FAMILIES[method])
        assert proc.returncode == 0, proc.stderr[-2000:]
        self[method] = out
        return out


@pytest.fixture(scope="module")
def singles(tmp_path_factory) -> dict[str, Path]:
    return _Singles(tmp_path_factory.mktemp("singles"))


@pytest.mark.distributed
@pytest.mark.parametrize("method", extended_but(FAMILIES, "diff_pruning"))
def test_two_ranks_train_like_one_process(singles, method, tmp_path):
    proc = run_ddp(tmp_path / "ddp", *COMMON, *FAMILIES[method])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(singles[method]), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 6
    for (la, ga), (lb, gb) in zip(a, b):  # fp32: all-reduce order changes the last bits only
        assert la == pytest.approx(lb, rel=2e-6) and ga == pytest.approx(gb, rel=2e-6)
    wa, wb = _state(singles[method], method), _state(tmp_path / "ddp", method)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


@EXTENDED
@pytest.mark.parametrize("method", ["prefix_tuning", "diff_pruning"])
def test_sigkill_then_resume_is_bit_exact(singles, method, tmp_path):
    out = tmp_path / "run"
    killed = run_single(out, *COMMON, *FAMILIES[method], fault="kill@step:5")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_single(out, *COMMON, *FAMILIES[method])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 3)" in resumed.stdout
    assert losses(out) == losses(singles[method])
    a, b = _state(out, method), _state(singles[method], method)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
@EXTENDED
def test_deepspeed_zero2_trains_diff_pruning_like_one_process(singles, tmp_path):
    """The penalty and the sampled gates under DeepSpeed's engine (its own backward and step)."""
    pytest.importorskip("deepspeed")
    proc = run_ds(tmp_path / "zero2", *COMMON, *FAMILIES["diff_pruning"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (la, ga), (lb, gb) in zip(losses(singles["diff_pruning"]), losses(tmp_path / "zero2"), strict=True):
        assert la == pytest.approx(lb, rel=2e-6) and ga == pytest.approx(gb, rel=2e-6)
