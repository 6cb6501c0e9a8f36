"""The 4-bit base sharded across ranks: FSDP2 and DeepSpeed ZeRO-3 on CPU (gloo, 2 processes).

Runs are combined so the file costs few process launches: each engine's 2-rank run is SIGKILLed
after step 6 (its last checkpoint is step 3) and then resumed, so the killed run's log is the
uninterrupted trajectory for the bit-exact check and the resumed run's log is the whole run for
the "2 ranks == 1 process" check. Every run has a NaN loss on rank 1 at step 2 (the single
process at step 2), so the non-finite guard's agreement across ranks is checked on the way.
FSDP's checkpoint is also resumed by 1 process (preempted there) and that one's by 2 processes.
ZeRO-3 runs under the `deepspeed` launcher as users type it (it appends `--local_rank=N`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

from parallel_runs import REPO, TINY, clean_env, tool  # noqa: E402
from tiers import EXTENDED  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NAN = "nan@step:2:rank:1"
KILL = "kill@step:6:rank:1"
# The tiny model's tensors are all below ZeRO-3's default persistence threshold (1e5 values),
# which would keep them whole on every rank; 0 makes ZeRO-3 partition them as it would a real model.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
# 7 NF4 weights; each rank's half may differ from an exact half by one block row (32 + 1 bytes)
# and holds its own copy of the small replicated quant state (absmax2 + offset, 8 bytes here).
NF4_WEIGHTS, BLOCK_ROW, REPLICATED = 7, 33, 8


def _train(out: Path, nproc: int, *extra: str, fault: str | None = None, launcher: str = "torchrun"):
    """`qtrain train` on the tiny recipe; micro-batch 4 // nproc, so the global batch is the same."""
    args = ["train", "configs/quickstart.yaml", f"output_dir={out}", *TINY, f"train.micro_batch_size={4 // nproc}",
            *extra]
    if launcher == "deepspeed":  # as users type it: the launcher appends --local_rank=N
        cmd = [tool("deepspeed"), "--num_nodes", "1", "--num_gpus", str(nproc), "--module", "qtrain", *args]
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "qtrain", *args]
    else:
        cmd = [sys.executable, "-m", "qtrain", *args]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(fault), capture_output=True, text=True, timeout=400)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict]) -> None:
    """Same skipped steps; elsewhere losses and grad norms within 2e-6 relative (fp32 reduction order)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.get("skipped", False) == rb.get("skipped", False), (ra, rb)
        if not ra.get("skipped"):
            assert ra["loss"] == pytest.approx(rb["loss"], rel=2e-6), (ra, rb)
            assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=2e-6), (ra, rb)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharding")
    (path / "zero3.json").write_text(json.dumps(ZERO3))
    return path


@pytest.fixture(scope="module")
def single(root) -> Path:
    proc = _train(root / "single", 1, fault="nan@step:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "single"


def _killed_then_resumed(root: Path, name: str, *extra: str, launcher: str = "torchrun") -> dict:
    out = root / name
    killed = _train(out, 2, *extra, fault=f"{NAN},{KILL}", launcher=launcher)
    assert killed.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-3"]
    before = _records(out)
    shutil.copytree(out, root / f"{name}-copy")
    resumed = _train(out, 2, *extra, fault=NAN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "before": before, "stdout": resumed.stdout, "copy": root / f"{name}-copy"}


@pytest.fixture(scope="module")
def fsdp(root) -> dict:
    # gradient checkpointing with `train.recompute: auto`: FSDP2 replays a selective recompute (the
    # fastest mode on any CPU box this runs on), and still equals one process without checkpointing
    return _killed_then_resumed(root, "fsdp", "distributed.engine=fsdp", "train.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def zero3(root) -> dict:
    # gradient checkpointing on: ZeRO-3 gathers again for the recompute (values are unchanged)
    return _killed_then_resumed(root, "zero3", "distributed.engine=deepspeed",
                                f"distributed.deepspeed_config={root / 'zero3.json'}",
                                "train.gradient_checkpointing=true", launcher="deepspeed")


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_two_ranks_equal_one_process_and_a_nan_on_one_rank_skips_everywhere(request, single, engine):
    run = request.getfixturevalue(engine)
    a, b = _records(single), _records(run["out"])
    assert len(a) == 6 and [r["step"] for r in a if r.get("skipped")] == [2]
    _close(a, b)
    wa = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run["out"] / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)
    summary = json.loads((run["out"] / "summary.json").read_text())
    assert summary["recompute"] == ("matmuls" if engine == "fsdp" else "full"), summary["recompute_reason"]


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sigkill_of_one_rank_then_resume_is_bit_exact(request, engine):
    run = request.getfixturevalue(engine)
    assert "(step 3)" in run["stdout"]
    before = {r["step"]: (r["loss"], r["grad_norm"]) for r in run["before"]}
    after = {r["step"]: (r["loss"], r["grad_norm"]) for r in _records(run["out"])}
    assert sorted(before) == [1, 2, 3, 4, 5]  # step 6 ran, but the kill came before its log line
    for step in (4, 5):  # computed before the kill and again after the resume from step 3
        assert after[step] == before[step]


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_each_rank_holds_half_of_the_4bit_base(request, single, engine):
    one = json.loads((single / "summary.json").read_text())["nf4_bytes_per_rank"]
    summary = json.loads((request.getfixturevalue(engine)["out"] / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert abs(summary["nf4_bytes_per_rank"] - one / 2) <= NF4_WEIGHTS * (BLOCK_ROW + REPLICATED), (one, summary)


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_the_saved_adapter_is_whole_and_gives_our_logits_in_peft(request, engine):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qtrain.infer.load import BaseOptions, load_with_adapters

    adapter = request.getfixturevalue(engine)["out"] / "adapter"
    ours, _, _, base_dir = load_with_adapters({"default": str(adapter)}, opts=BaseOptions(torch.float32, None))
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        base = hf(input_ids=ids).logits
        hf = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
        theirs, mine = hf(input_ids=ids).logits, ours.eval()(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(theirs, base, atol=1e-4)  # the adapter really changes the output


@EXTENDED
def test_fsdp_checkpoints_reshard_two_to_one_and_one_to_two(single, fsdp):
    """2 ranks' step 3 -> 1 process (preempted after step 4) -> 2 ranks (preempted after step 5)."""
    out = fsdp["copy"]
    one = _train(out, 1, "distributed.engine=fsdp", fault="signal@step:4:TERM")
    assert one.returncode == 75, one.stderr[-3000:]
    assert "(step 3)" in one.stdout
    two = _train(out, 2, "distributed.engine=fsdp", fault="signal@step:5:TERM:rank:1")
    assert two.returncode != 0 and "preempted" in two.stderr
    assert "(step 4)" in two.stdout and "no random state for rank 1" in two.stderr
    _close(_records(single)[:5], _records(out))
    files = json.loads((out / "checkpoints" / "step-5" / "manifest.json").read_text())["files"]
    assert {"rng-rank-0.safetensors", "rng-rank-1.safetensors"} <= set(files)  # both ranks stopped at step 5


def _two_ranks_say_ok(script: str, root: Path, kinds: tuple[str, ...]) -> None:
    """Run tests/integration/SCRIPT under torchrun on 2 processes; each must print ": KIND ok" for every kind."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "integration" / script), str(root / "zero3.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]  # stdout: which checks passed first
    for kind in kinds:
        assert proc.stdout.count(f": {kind} ok") == 2, proc.stdout


def test_nf4_bytes_with_nan_and_inf_patterns_survive_fsdp_and_zero3_gathers(root):
    """Sharded on whole blocks (33 blocks over 2 ranks: padded), gathered for forward and backward."""
    _two_ranks_say_ok("sharded_bytes.py", root, ("fsdp", "zero3"))


def test_zero3_gathers_the_frozen_embedding_and_head_in_row_parts(root):
    """Untied and tied: both vocabulary matrices become several partitioned row parts, and a step's loss
    and update equal the whole model's (zero3_vocab_parts.py)."""
    _two_ranks_say_ok("zero3_vocab_parts.py", root, ("untied", "tied"))
