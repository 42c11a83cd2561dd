"""wandb without an account: offline runs with the metrics, one per sweep job, a shared group, resume."""

import os

import pytest

from tests.lit.test_ddp import TINY_CLI, run_cli


def offline_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)  # no ~/.netrc: no credentials
    return env


def wandb_records(run_dir):
    """{run id: the bytes of its offline .wandb files}; keys and values are stored as plain text in them."""
    runs = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id = path.stem.removeprefix("run-")
        runs[run_id] = runs.get(run_id, b"") + path.read_bytes()
    return runs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_wandb_in_a_sweep_and_on_resume(tmp_path):
    env = offline_env(tmp_path)
    proc, out = run_cli("-m", "model.kv_heads=1,2", "logger=wandb", *TINY_CLI, f"output_root={tmp_path}", env=env)
    assert proc.returncode == 0, out[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    ids = []
    for job in jobs:
        (metrics_csv,) = job.glob("metrics.csv")  # CSV stays on next to wandb
        records = wandb_records(job)
        assert list(records) == [(job / "wandb_id.txt").read_text().strip()]  # one run per job
        data = next(iter(records.values()))
        assert b"train/loss" in data and b"val/loss" in data  # the metrics
        assert b"kv_heads" in data and b"seq_len" in data  # the resolved Hydra config
        assert f"sweep-{sweep_dir.name}".encode() in data  # the sweep's group
        ids.extend(records)
    assert len(set(ids)) == 2
    assert "sweep summary (2 jobs, 0 failed)" in out

    # A single run, then its resume: the same wandb run id continues.
    common = ("logger=wandb", *TINY_CLI, "run_name=single", f"output_root={tmp_path}")
    assert run_cli(*common, env=env)[0].returncode == 0
    run_dir = tmp_path / "single"
    proc, out = run_cli(*common, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=8", env=env)
    assert proc.returncode == 0, out[-3000:]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert list(wandb_records(run_dir)) == [(run_dir / "wandb_id.txt").read_text().strip()]
