"""Distributed training on CPU (gloo): DDP on one machine, resume, and a simulated two-node run."""

import csv
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

TINY_CLI = ("debug=fast", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0")
DDP_CPU = ("trainer=ddp", "trainer.accelerator=cpu")


def run_cli(*args, timeout=240, env=None):
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    return proc, proc.stdout + proc.stderr


def train_rows(path):
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["train/loss"]]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_cpu_ranks_share_the_run_dir_and_resume_compiled(tmp_path):
    args = (*TINY_CLI, *DDP_CPU, "trainer.devices=2", "run_name=ddp", f"output_root={tmp_path}")
    proc, out = run_cli(*args)
    assert proc.returncode == 0, out[-3000:]
    assert "MEMBER: 2/2" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 1 made no directory of its own
    run_dir = tmp_path / "ddp"
    assert (run_dir / "train_rank1.log").is_file()  # rank 1 ran in the same run directory
    rows = train_rows(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))  # one writer: no duplicated rows
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1 and len(list(tmp_path.rglob("last.ckpt"))) == 1

    # Resumed with the blocks compiled: compile works under DDP and loads an eager run's checkpoint.
    proc, out = run_cli(*args, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=8", "compile=true")
    assert proc.returncode == 0, out[-3000:]
    assert "torch.compile: 2 decoder blocks" in out
    steps = [int(r["step"]) for r in train_rows(run_dir / "metrics.csv")]
    assert steps[:6] == list(range(6)) and len(steps) > 6 and min(steps[6:]) >= 6  # continued, not restarted
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_simulated_two_node_run_with_torchrun(tmp_path):
    """Two torchrun "nodes" on 127.0.0.1, one process each, as on a cluster with a shared filesystem."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    procs = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "train.py",
               *TINY_CLI, *DDP_CPU, "trainer.devices=1", "trainer.num_nodes=2", "run_name=nodes",
               f"output_root={tmp_path}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "MEMBER: 1/2" in outs[0] and "MEMBER: 2/2" in outs[1]
    assert "final val/loss" in outs[0] and "final val/loss" not in outs[1]  # only global rank 0 reports
    rows = train_rows(tmp_path / "nodes" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert (tmp_path / "nodes" / "checkpoints" / "last.ckpt").is_file()
