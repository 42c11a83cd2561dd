"""Checkpoint safety: atomic writes, ckpt_path=last, bad and unsafe checkpoints, non-finite losses."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mgqa.lit.checkpoint import CheckpointError, atomic_torch_save, find_resume_checkpoint, load_checkpoint
from mgqa.lit.module import LanguageModel, NonFiniteLossError
from mgqa.lit.run import train
from mgqa.model import ConfigError
from tests.conftest import ROOT, TINY, compose
from tests.lit.test_training import read_rows

SHORT = (*TINY, "sample.max_new_tokens=0", "callbacks.latest_checkpoint.every_n_train_steps=3")


def trained_run(run_dir, *extra):
    train(compose(*SHORT, f"run_dir={run_dir}", *extra))
    return run_dir / "checkpoints"


def train_steps(run_dir):
    return [int(r["step"]) for r in read_rows(run_dir / "metrics.csv") if r["train/loss"]]


def test_kill_during_checkpoint_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    writer = (
        "import torch; from mgqa.lit.checkpoint import atomic_torch_save; "
        f"atomic_torch_save({{'state_dict': {{'w': torch.randn(100_000_000)}}, 'global_step': 2}}, {str(target)!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size > 0 for p in tmp_path.glob(".last.ckpt.*.tmp*")):
        time.sleep(0.005)
    assert any(tmp_path.glob(".last.ckpt.*.tmp*")), "the writer never started its temporary file"
    proc.kill()  # kill -9 in the middle of the write
    proc.wait()
    survivor = load_checkpoint(target)
    assert survivor["global_step"] == 1 and torch.equal(survivor["state_dict"]["w"], torch.ones(3))


def test_ckpt_path_last_starts_fresh_then_resumes_and_skips_a_corrupt_file(tmp_path, caplog):
    run_dir = tmp_path / "run"
    ckpts = trained_run(run_dir, "ckpt_path=last")  # nothing to resume yet: a fresh start
    assert train_steps(run_dir) == list(range(6))
    assert (ckpts / "last.ckpt").is_file()
    (ckpts / "last.ckpt").write_bytes(b"torn write")  # the newest file is corrupt
    with caplog.at_level("WARNING", logger="mgqa"):
        train(compose(*SHORT, f"run_dir={run_dir}", "ckpt_path=last", "trainer.max_steps=9"))
    assert any("last.ckpt" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert train_steps(run_dir) == list(range(9))  # resumed at 6: every step once in metrics.csv
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 9


def test_a_finished_run_continues_with_more_steps(tmp_path):
    run_dir = tmp_path / "run"
    trained_run(run_dir)  # 6 steps, then finished
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    train(compose(*SHORT, f"run_dir={run_dir}", "ckpt_path=last", "trainer.max_steps=9"))
    assert train_steps(run_dir) == list(range(9))
    val_steps = [int(r["step"]) for r in read_rows(run_dir / "metrics.csv") if r["val/loss"]]
    assert val_steps == sorted(val_steps) and max(val_steps) <= 9


def test_fresh_start_never_overwrites_a_runs_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    trained_run(run_dir)
    with pytest.raises(ConfigError, match="already holds checkpoints.*ckpt_path=last"):
        train(compose(*SHORT, f"run_dir={run_dir}"))


def test_bad_checkpoints_are_named(tmp_path):
    ckpts = trained_run(tmp_path / "run")
    good = ckpts / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.ckpt is truncated or corrupt"):
        train(compose(*SHORT, f"run_dir={tmp_path / 'a'}", f"ckpt_path={truncated}"))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        train(compose(*SHORT, f"run_dir={tmp_path / 'b'}", f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    with pytest.raises(CheckpointError) as err:
        train(compose(*SHORT, f"run_dir={tmp_path / 'c'}", f"ckpt_path={good}", "model.kv_heads=4", "model.dim=96"))
    assert "model.kv_heads: checkpoint 2, this run 4" in str(err.value)
    assert "model.dim: checkpoint 64, this run 96" in str(err.value)
    with pytest.raises(CheckpointError, match="model.num_tokens: checkpoint 257, this run 300"):
        train(compose(*SHORT, f"run_dir={tmp_path / 'd'}", f"ckpt_path={good}", "model.num_tokens=300"))
    other_tokenizer = load_checkpoint(good)
    other_tokenizer["hyper_parameters"]["tokenizer"] = {"name": "bpe", "vocab_size": 257}
    torch.save(other_tokenizer, tmp_path / "bpe.ckpt")
    with pytest.raises(CheckpointError, match="tokenizer: checkpoint"):
        train(compose(*SHORT, f"run_dir={tmp_path / 'e'}", f"ckpt_path={tmp_path / 'bpe.ckpt'}"))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Exploit(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*evil.ckpt"):
        train(compose(*SHORT, f"run_dir={tmp_path / 'run'}", f"ckpt_path={evil}"))
    assert not marker.exists()


def _nan_loss_at(monkeypatch, steps):
    real = LanguageModel._loss

    def loss(self, batch):
        value = real(self, batch)
        return value * float("nan") if self.training and self.global_step in steps else value

    monkeypatch.setattr(LanguageModel, "_loss", loss)


# fused: the default, checked on the device and read a step later; unfused: checked before the backward pass.
@pytest.mark.parametrize("fused", ["null", "false"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, fused):
    _nan_loss_at(monkeypatch, {4})
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 4"):
        train(compose(*SHORT, f"run_dir={run_dir}", f"optim.optimizer.fused={fused}"))
    path, last = find_resume_checkpoint(run_dir)  # what ckpt_path=last would resume
    assert path.name == "step000003.ckpt" and last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


@pytest.mark.parametrize("fused", ["null", "false"])
def test_nan_loss_can_skip_batches_up_to_a_limit(tmp_path, monkeypatch, fused):
    _nan_loss_at(monkeypatch, {2, 3})
    val_loss = train(compose(*SHORT, f"run_dir={tmp_path / 'ok'}", "nonfinite_loss.action=skip", f"optim.optimizer.fused={fused}"))
    assert val_loss is not None and val_loss == val_loss  # finished, finite
    rows = [r for r in read_rows(tmp_path / "ok" / "metrics.csv") if r["train/loss"]]
    logged = {int(r["step"]): (r["train/loss"], r.get("train/skipped_batches")) for r in rows}
    assert logged[2] == ("nan", "1.0") and logged[3] == ("nan", "2.0")  # skipped steps logged as such
    before = "0.0" if fused == "null" else ""  # the fused step logs the count at every step
    assert logged[4][0] != "nan" and all(logged[s][1] == before for s in (0, 1))
    _nan_loss_at(monkeypatch, {1, 2, 3, 4})
    with pytest.raises(NonFiniteLossError):
        train(compose(*SHORT, f"run_dir={tmp_path / 'limit'}", "nonfinite_loss.action=skip", "nonfinite_loss.max_skips=2",
                      f"optim.optimizer.fused={fused}"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_saves_a_checkpoint_and_the_run_resumes(tmp_path, signum):
    args = [sys.executable, "train.py", "debug=fast", "run_name=sig", f"output_root={tmp_path}", "trainer.enable_progress_bar=false",
            "callbacks.latest_checkpoint.every_n_train_steps=5", "sample.max_new_tokens=0"]
    proc = subprocess.Popen([*args, "trainer.max_steps=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = tmp_path / "sig" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(ckpts.glob("step*.ckpt")):
        time.sleep(0.1)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"received {signal.Signals(signum).name}" in out
    stopped = load_checkpoint(ckpts / "last.ckpt")["global_step"]
    assert stopped >= 5
    done = subprocess.run([*args, "ckpt_path=last", f"trainer.max_steps={stopped + 3}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"(step {stopped})" in done.stdout + done.stderr
    assert train_steps(tmp_path / "sig") == list(range(stopped + 3))


def test_resume_keeps_a_non_default_end_of_text_token(tmp_path):
    """The resume check compares the checkpoint's tokenizer with the data module's own, end-of-text
    token included: a run trained with ``data.eot_token`` set resumes, and the same tokenizer with
    another end-of-text token is refused, naming the tokenizer."""
    spec = json.loads((ROOT / "data/tokenizers/shakespeare-bpe-2k.json").read_text())
    vocab = spec["model"]["vocab"]
    new_id = max(max(vocab.values()), *(t["id"] for t in spec["added_tokens"])) + 1
    spec["added_tokens"].append({**spec["added_tokens"][0], "id": new_id, "content": "<|doc|>"})
    tokenizer = tmp_path / "two-ends.json"
    tokenizer.write_text(json.dumps(spec))
    run_dir = tmp_path / "run"
    data = (f"data.tokenizer={tokenizer}", "data.eot_token='<|doc|>'")
    trained_run(run_dir, *data)
    train(compose(*SHORT, *data, f"run_dir={run_dir}", "ckpt_path=last", "trainer.max_steps=9"))
    assert train_steps(run_dir) == list(range(9))
    with pytest.raises((CheckpointError, ConfigError), match="tokenizer"):
        train(compose(*SHORT, f"data.tokenizer={tokenizer}", f"run_dir={run_dir}", "ckpt_path=last",
                      "trainer.max_steps=12"))
