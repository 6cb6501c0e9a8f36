"""The SLURM script requeues exactly when qtrain exits with the preemption code (75)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm" / "single_node.sbatch"
TINY = ["model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
        "model.from_config.num_hidden_layers=1", "model.from_config.num_attention_heads=2",
        "model.from_config.num_key_value_heads=1", "train.max_steps=4", "logging.progress=false",
        "checkpoint.every_steps=0"]


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def _run(tmp_path: Path, fault: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    marker = tmp_path / "requeued"
    (fake_bin / "scontrol").write_text(f"#!/usr/bin/env bash\necho \"$@\" > {marker}\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {**os.environ, "SLURM_JOB_ID": "4242",
           "PATH": f"{fake_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("QTRAIN_FAULT", None)
    if fault:
        env["QTRAIN_FAULT"] = fault
    cmd = ["bash", str(SCRIPT), "configs/quickstart.yaml", f"output_dir={tmp_path / 'out'}", *TINY]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300), marker


@pytest.mark.slow
def test_preempted_run_is_requeued(tmp_path):
    proc, marker = _run(tmp_path, "signal@step:2:USR1")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert marker.read_text().split() == ["requeue", "4242"]


@pytest.mark.slow
def test_finished_run_is_not_requeued(tmp_path):
    proc, marker = _run(tmp_path, None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


def _multi_node_dry_run(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`script` as SLURM would start it on 2 nodes (gpu01, gpu02), printing the launch instead of running it."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu01\\ngpu02\\n"\n')
    (fake_bin / "scontrol").chmod(0o755)
    full_env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "QTRAIN_DRY_RUN": "1",
                "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", **env}
    path = REPO / "launch" / "slurm" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    return subprocess.run(["bash", str(path), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=30)


def test_multi_node_dry_run_prints_the_exact_launch_for_2_nodes_x_4_gpus(tmp_path):
    proc = _multi_node_dry_run(tmp_path, "multi_node.sbatch", "configs/llama3_8b_qlora_multi_gpu.yaml",
                               "train.max_steps=10", SLURM_GPUS_PER_NODE="4", SLURM_NODEID="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc_per_node", "4",
        "--rdzv_id", "77", "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu01:29500",
        "-m", "qtrain", "train", "configs/llama3_8b_qlora_multi_gpu.yaml", "train.max_steps=10"]


def test_multi_node_deepspeed_dry_run_writes_the_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    proc = _multi_node_dry_run(tmp_path, "multi_node.sbatch", "configs/llama3_8b_qlora_multi_gpu.yaml",
                               "distributed.engine=deepspeed", SLURM_GPUS_PER_NODE="4", QTRAIN_LAUNCHER="deepspeed",
                               QTRAIN_HOSTFILE=str(hostfile))
    assert proc.returncode == 0, proc.stderr
    assert hostfile.read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    assert proc.stdout.split() == [
        "deepspeed", "--hostfile", str(hostfile), "--master_addr", "gpu01", "--master_port", "29500",
        "--no_local_rank", "--module", "qtrain", "train", "configs/llama3_8b_qlora_multi_gpu.yaml",
        "distributed.engine=deepspeed"]


def test_multi_node_fsdp_dry_run_launches_torchrun_with_the_fsdp_engine(tmp_path):
    # QTRAIN_LAUNCHER=deepspeed left over in the environment must not change an FSDP launch
    proc = _multi_node_dry_run(tmp_path, "multi_node_fsdp.sbatch", "configs/llama3_70b_qlora_fsdp.yaml",
                               "train.max_steps=10", SLURM_GPUS_PER_NODE="8", QTRAIN_LAUNCHER="deepspeed",
                               SLURM_SUBMIT_DIR=str(REPO))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc_per_node", "8",
        "--rdzv_id", "77", "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu01:29500",
        "-m", "qtrain", "train", "configs/llama3_70b_qlora_fsdp.yaml", "train.max_steps=10", "distributed.engine=fsdp"]


def test_torchrun_wrapper_dry_run():
    env = {**os.environ, "QTRAIN_DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "2", "configs/quickstart.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.split() == ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "qtrain", "train",
                                   "configs/quickstart.yaml"]
