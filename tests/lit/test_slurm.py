"""Sweeps through hydra-submitit-launcher: jobs in other processes (the local executor, on CPU) and the
SLURM job that conf/hydra/launcher/slurm.yaml describes for a DDP job (its sbatch script, not submitted)."""

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from mgqa.lit.sweep import read_summary
from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submitit_local_sweep_reports_a_job_run_in_another_process(tmp_path):
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "model.kv_heads=2",
            "debug=fast", "trainer.max_steps=1", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0",
            f"output_root={tmp_path}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (sweep_dir,) = (tmp_path / "multirun").iterdir()
    (job,) = [p for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]  # the submitit job's folder
    assert list(job.glob("*_result.pkl"))
    # The job ran in another process; its row reached summary.csv and the table the sweep printed.
    assert [(r["job"], r["status"]) for r in read_summary(sweep_dir / "summary.csv")] == [("0", "ok")]
    assert "sweep summary (1 jobs, 0 failed)" in proc.stdout


def test_slurm_launcher_asks_for_one_task_per_ddp_device(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mgqa.lit.config import register_configs

    # submitit looks for srun before it writes an sbatch script; the script is read here, never submitted.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                                          "trainer.devices=4", "trainer.num_nodes=2", f"output_root={tmp_path}"],
                      return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_.endswith("SlurmLauncher")

    scripts = []

    def capture(executor, fn, *iterables):
        scripts.append(executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid"))
        raise RuntimeError("captured")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    launcher = instantiate(launcher_cfg)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(RuntimeError, match="captured"):
        launcher.launch([["model.kv_heads=1"]], initial_job_idx=0)
    (script,) = scripts
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240",
                 "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, script
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder").startswith(str(tmp_path))
