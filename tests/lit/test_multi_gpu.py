"""DDP and FSDP on two CUDA GPUs (NCCL): train, exit, resume, and a DDP sweep. Run on a 2-GPU machine."""

import math

import pytest
import torch

from tests.lit.test_ddp import TINY_CLI, run_cli, train_rows

SAMPLE_CLI = tuple(a for a in TINY_CLI if not a.startswith("sample.")) + ("sample.max_new_tokens=16",)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

# A process that hangs after training (e.g. in a process-group teardown) fails here, not in CI's timeout.
EXIT_TIMEOUT_S = 180


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_exit_and_resume(strategy, tmp_path):
    args = (*SAMPLE_CLI, f"trainer={strategy}", "trainer.devices=2", f"run_name={strategy}", f"output_root={tmp_path}")
    proc, out = run_cli(*args, timeout=EXIT_TIMEOUT_S)
    assert proc.returncode == 0, out[-3000:]
    assert "MEMBER: 2/2" in out and "final val/loss" in out
    run_dir = tmp_path / strategy
    assert (run_dir / "sample.txt").stat().st_size > 0  # generated from the full (unsharded) weights
    assert sorted(p.name for p in tmp_path.iterdir()) == [strategy]
    rows = train_rows(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()

    proc, out = run_cli(*args, "ckpt_path=last", "trainer.max_steps=9", timeout=EXIT_TIMEOUT_S)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out and "(step 6)" in out
    steps = [int(r["step"]) for r in train_rows(run_dir / "metrics.csv")]
    assert steps == list(range(9))
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 9
    # The checkpoint holds the full (unsharded) model, loadable on one device.
    assert tuple(state["state_dict"]["model.token_emb.weight"].shape) == (257, 64)

@pytest.mark.timeout(600)
def test_ddp_sweep_on_two_gpus_runs_each_job_once(tmp_path):
    proc, out = run_cli("-m", *TINY_CLI, "trainer=ddp", "trainer.devices=2", "model.kv_heads=1,2",
                        f"output_root={tmp_path}", timeout=2 * EXIT_TIMEOUT_S)
    assert proc.returncode == 0, out[-3000:]
    metrics = sorted(tmp_path.rglob("metrics.csv"))
    assert len(metrics) == 2, metrics
    for path in metrics:
        assert [int(r["step"]) for r in train_rows(path)] == list(range(6))
    assert len(list(tmp_path.rglob("summary.csv"))) == 1
