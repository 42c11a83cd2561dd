"""The sweep summary a user reads: labels from the overrides that vary, the two-panel plot, resuming; the
sweep runs from another directory, so it also shows that paths don't depend on the launch directory."""

import random
import shlex
import subprocess
import sys

import pytest
from PIL import Image

from mgqa.lit.sweep import format_table, job_labels, read_summary, sweep_figure
from tests.conftest import ROOT

# The sweep, on the debug=fast model with 8 heads so that kv_heads=1,2,8 all divide it.
SWEEP = ("-m", "model.kv_heads=1,2,8", "trainer.max_steps=4", "trainer.val_check_interval=2")
TINY = ("debug=fast", "model.heads=8", "trainer.enable_progress_bar=false", "sample.max_new_tokens=0")
# What the console must not show (fixed in mgqa/lit/console.py, mgqa/lit/summary.py, mgqa/lit/callbacks.py).
NOISE = ("Tip:", "litlogger", "deprecated", "Total FLOPs", "weights_only", "Warning", "Traceback")


def run(args, cwd):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=280)
    return proc, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kv_heads_sweep_from_another_directory_is_labelled_by_what_varies_and_resumes(tmp_path):
    elsewhere, outputs = tmp_path / "elsewhere", tmp_path / "outputs"
    elsewhere.mkdir()
    proc, out = run([sys.executable, str(ROOT / "train.py"), *SWEEP, *TINY, f"paths.output_dir={outputs}"], elsewhere)
    assert proc.returncode == 0, out[-3000:]
    # The data was found from elsewhere; everything went under the configured output root (debug runs: debug/).
    assert list(elsewhere.iterdir()) == []
    (sweep_dir,) = (outputs / "debug" / "multirun").iterdir()
    assert all((job / "checkpoints" / "last.ckpt").is_file() for job in sweep_dir.iterdir() if job.name[0].isdigit())
    for noise in NOISE:
        assert noise not in out, f"{noise!r} on the console:\n{out[-3000:]}"
    rows = read_summary(sweep_dir / "summary.csv")
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert job_labels(rows, ["model.kv_heads"]) == ["kv_heads=1", "kv_heads=2", "kv_heads=8"]
    table = proc.stdout[proc.stdout.index("sweep summary"):].split("\nsummary: ")[0]
    assert table.splitlines()[1].split()[:2] == ["job", "kv_heads"]  # one column for the varying override
    assert "max_steps" not in table and "val_check_interval" not in table  # shared overrides left out
    png = Image.open(sweep_dir / "summary.png")
    description = png.text["Description"]
    assert "training throughput (tokens/s) vs final validation loss" in description
    assert "KV cache (bytes/token, bf16) vs final validation loss" in description
    assert description.endswith("jobs: kv_heads=1, kv_heads=2, kv_heads=8")
    width, height = png.size
    assert 900 < width < 1600 and 1.8 < width / height < 3.2  # two panels, not squeezed by long labels

    # The sweep printed how to resume it: the same command, pinned to its directory, with ckpt_path=last.
    resume = next(line.strip() for line in out.splitlines() if line.strip().startswith("python "))
    assert f"hydra.sweep.dir={sweep_dir}" in resume and resume.endswith("ckpt_path=last")
    proc, out = run([sys.executable, *shlex.split(resume)[1:]], elsewhere)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("resuming from") == 3 and "(step 4)" in out  # every job continued from its last.ckpt
    assert list((outputs / "debug" / "multirun").iterdir()) == [sweep_dir]
    assert [r["status"] for r in read_summary(sweep_dir / "summary.csv")] == ["ok"] * 3


def test_twenty_jobs_stay_readable():
    random.seed(0)
    grid = [(k, lr) for k in (1, 2, 4, 8) for lr in ("1e-3", "2e-3", "3e-3", "4e-3", "5e-3")]
    rows = [{"job": i, "overrides": f"model.kv_heads={k} optim.optimizer.lr={lr} trainer.max_steps=40",
             "status": "ok", "val_loss": 2 + random.random(), "tokens_per_s": 1000 + 500 * random.random(),
             "params": 122000, "kv_cache_bytes_per_token": 128 * k} for i, (k, lr) in enumerate(grid)]
    fig = sweep_figure(rows)
    loss_vs_speed, loss_vs_kv = fig.axes[:2]
    assert loss_vs_kv.get_xlabel() == "KV cache (bytes/token, bf16)" and loss_vs_kv.get_xscale() == "log"
    width_in = fig.get_size_inches()[0]
    assert all(ax.get_position().width * width_in > 3.5 for ax in (loss_vs_speed, loss_vs_kv))  # axes keep their size
    # Points carry job numbers; the key beside the axes gives each job's varying overrides.
    assert [t.get_text() for t in loss_vs_speed.texts] == [str(i) for i in range(20)]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()][:2] == ["0: kv_heads=1 lr=1e-3", "1: kv_heads=1 lr=2e-3"]
    header = format_table(rows).splitlines()[0].split()
    assert header[:3] == ["job", "kv_heads", "lr"] and "max_steps" not in header


def test_labels_fall_back_to_the_job_number_and_keep_colliding_names_whole():
    rows = [{"job": 0, "overrides": "a.lr=1 b.lr=2"}, {"job": 1, "overrides": "a.lr=1 b.lr=3"}]
    assert job_labels(rows) == ["lr=2", "lr=3"]
    rows[1]["overrides"] = "a.lr=2 b.lr=3"
    assert job_labels(rows) == ["a.lr=1 b.lr=2", "a.lr=2 b.lr=3"]
    assert job_labels([{"job": 0, "overrides": "trainer.max_steps=4"}]) == ["job 0"]
