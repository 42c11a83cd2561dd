"""An interrupted and resumed run logs exactly the losses of an uninterrupted one (CPU, fp32)."""

import signal
import subprocess
import sys
import time

import pytest

from mgqa.lit.checkpoint import load_checkpoint
from tests.conftest import ROOT
from tests.lit.test_training import read_rows

STEPS = 40
ARGS = (
    "debug=fast",
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=16",
    "trainer.accumulate_grad_batches=2",  # the accumulation phase must survive too
    "trainer.enable_progress_bar=false",
    "model.dropout=0.1",  # random numbers drawn every step: the RNG state must be restored
    "data.num_workers=2",
    "callbacks.latest_checkpoint.every_n_train_steps=5",
    "sample.max_new_tokens=0",
)


def run(tmp_path, name, *extra, **popen):
    cmd = [sys.executable, "train.py", *ARGS, f"run_name={name}", f"output_root={tmp_path}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def losses(run_dir):
    """(step, train/loss) rows as written in metrics.csv, in order; strings, so the comparison is
    bit for bit. With gradient accumulation each optimizer step has one row per micro-batch."""
    return [(int(r["step"]), r["train/loss"]) for r in read_rows(run_dir / "metrics.csv") if r["train/loss"]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_then_ckpt_path_last_reproduces_the_uninterrupted_losses(tmp_path):
    full = run(tmp_path, "full")
    out, _ = full.communicate(timeout=400)
    assert full.returncode == 0, out[-3000:]

    interrupted = run(tmp_path, "cut", "ckpt_path=last")
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not any(ckpts.glob("step*.ckpt")) and interrupted.poll() is None:
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGTERM)
    out, _ = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 0, out[-3000:]
    stopped = load_checkpoint(ckpts / "last.ckpt")["global_step"]
    assert 0 < stopped < STEPS, f"the signal should land mid-run, it landed at step {stopped}"

    resumed = run(tmp_path, "cut", "ckpt_path=last")
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]

    expected, got = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted({s for s, _ in expected}) == list(range(STEPS))
    assert [s for s, _ in got] == [s for s, _ in expected], f"stopped at {stopped}: the resumed run logged other steps"
    mismatched = [(e, g) for e, g in zip(expected, got) if e != g]
    assert not mismatched, f"stopped at {stopped}; first differing rows (step, loss): {mismatched[:3]}"
