"""data=tokens through the real `python train.py`: a run resumed mid-epoch from a checkpoint logs
bit-identical per-step losses to the uninterrupted run (CPU, fp32, 2 dataloader workers)."""

import subprocess
import sys

import pytest

from mgqa.data.prepare import compose_config, prepare
from tests.conftest import ROOT
from tests.lit.test_resume_exact import losses

STEPS = 12


def train(tmp_path, tokens, name, *extra):
    cmd = [
        sys.executable, "train.py", "debug=fast", "data=tokens", f"data.dir={tokens}", "data.num_workers=2",
        f"trainer.max_steps={STEPS}", "trainer.val_check_interval=6", "trainer.enable_progress_bar=false",
        "model.dropout=0.1", "callbacks.latest_checkpoint.every_n_train_steps=5", "sample.max_new_tokens=0",
        f"run_name={name}", f"output_root={tmp_path}", *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_from_a_mid_epoch_checkpoint_reproduces_the_losses(tmp_path):
    # The embedded corpus, prepared with shards small enough that windows come from many of them.
    tokens = prepare(compose_config([f"out={tmp_path / 'tokens'}", "shard_tokens=400000"]), print_fn=lambda *_: None, progress=False)
    train(tmp_path, tokens, "full")
    step5 = tmp_path / "full" / "checkpoints" / "step000005.ckpt"
    assert step5.is_file(), sorted(p.name for p in step5.parent.iterdir())
    resumed = train(tmp_path, tokens, "resumed", f"ckpt_path={step5}")
    assert "resuming from" in resumed.stdout + resumed.stderr

    expected = [row for row in losses(tmp_path / "full") if row[0] >= 5]
    got = losses(tmp_path / "resumed")
    assert [s for s, _ in got] == list(range(5, STEPS)) == [s for s, _ in expected]
    assert got == expected  # loss strings as written: bit for bit
