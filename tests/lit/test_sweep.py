"""Multirun sweeps: each job once, in its own directory, also with DDP ranks; failures; summary; Optuna."""

import csv
import math

import pytest

from tests.lit.test_ddp import DDP_CPU, TINY_CLI, run_cli, train_rows


def read_summary(sweep_dir):
    with open(sweep_dir / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_sweep_runs_each_job_once_and_survives_a_failed_job(tmp_path):
    # kv_heads=3 cannot divide 4 heads: the middle job fails, the DDP jobs around it run.
    proc, out = run_cli("-m", "model.kv_heads=1,3,2", *TINY_CLI, *DDP_CPU, "trainer.devices=2",
                        f"output_root={tmp_path}", timeout=280)
    assert proc.returncode != 0  # the sweep reports the failure...
    assert "Traceback" not in out and "error: 1 of 3 sweep jobs failed" in out  # ...in one line, after its table
    assert out.index("sweep summary (3 jobs, 1 failed)") < out.index("error: 1 of 3 sweep jobs failed")
    assert out.count("Launching 3 jobs") == 1  # ...no rank re-ran the sweep
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2"]
    rows = read_summary(sweep_dir)
    assert [r["status"] == "ok" for r in rows] == [True, False, True]
    assert "must divide" in rows[1]["status"]
    for job in (jobs[0], jobs[2]):
        assert (job / "train_rank1.log").is_file()  # rank 1 ran in this job's directory
        assert [int(r["step"]) for r in train_rows(job / "metrics.csv")] == list(range(6))  # once, one writer
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert out.count("MEMBER: 2/2") == 2
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(math.isfinite(float(r["val_loss"])) and float(r["tokens_per_s"]) > 0 for r in ok)
    assert [int(r["kv_cache_bytes_per_token"]) for r in ok] == [128, 256]  # 2 layers x K,V x kv_heads x 16 x 2 B
    assert (sweep_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_optuna_search_runs_two_trials(tmp_path):
    proc, out = run_cli("hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY_CLI, f"output_root={tmp_path}",
                        timeout=180)
    assert proc.returncode == 0, out[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    results = (sweep_dir / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.kv_heads" in results
    best = float(results.split("best_value:")[1].split()[0])
    rows = read_summary(sweep_dir)
    assert len(rows) == 2
    assert best == pytest.approx(min(float(r["val_loss"]) for r in rows), rel=1e-6)
