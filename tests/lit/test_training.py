"""Real training runs: through mgqa.lit.run.train (as train.py calls it) and through the CLI."""

import csv
import subprocess
import sys

import pytest
import torch

from mgqa.lit.run import train
from tests.conftest import ROOT, TINY, compose


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_compose_and_train_a_few_steps(tmp_path, capsys):
    cfg = compose(*TINY, f"run_dir={tmp_path}")
    val_loss = train(cfg)
    rows = read_rows(tmp_path / "metrics.csv")
    train_rows = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in train_rows] == list(range(6))
    # Throughput is logged from the step after the first (compilation, warm-up), which it leaves out.
    timed = [r for r in train_rows if r["train/tokens_per_s"]]
    assert [int(r["step"]) for r in timed] == list(range(1, 6))
    assert all(float(r["train/tokens_per_s"]) > 0 for r in timed)
    val_rows = [r for r in rows if r["val/loss"]]
    assert len(val_rows) >= 2 and float(val_rows[-1]["val/ppl"]) > 1
    # The final validation runs once, after the last step, and is the value reported.
    val_steps = [int(r["step"]) for r in val_rows]
    assert val_steps.count(val_steps[-1]) == 1
    assert val_loss == pytest.approx(float(val_rows[-1]["val/loss"]))
    assert float(train_rows[-1]["train/loss"]) < float(train_rows[0]["train/loss"])
    assert val_loss < 5.5  # below ln(257): the model learned something in 6 steps
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("best-step") for p in (tmp_path / "checkpoints").iterdir())
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "final val/loss" in out and "ROMEO." in out
    assert (tmp_path / "sample.txt").read_text().startswith("ROMEO.\n")


def test_resume_continues_step_count_and_schedule(tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = (
        *TINY,
        "trainer.max_steps=10",
        "callbacks.latest_checkpoint.every_n_train_steps=3",
        "callbacks.latest_checkpoint.save_top_k=-1",
        "sample.max_new_tokens=0",
    )
    train(compose(*common, f"run_dir={first}"))
    ckpt = first / "checkpoints" / "step000006.ckpt"
    assert ckpt.is_file()
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 6
    train(compose(*common, f"run_dir={resumed}", f"ckpt_path={ckpt}"))
    full = {int(r["step"]): float(r["train/lr"]) for r in read_rows(first / "metrics.csv") if r["train/lr"]}
    again = {int(r["step"]): float(r["train/lr"]) for r in read_rows(resumed / "metrics.csv") if r["train/lr"]}
    assert sorted(again) == [6, 7, 8, 9]  # the step count continues; no restart at 0
    assert all(again[s] == pytest.approx(full[s]) for s in again)  # the LR schedule continues


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(compose(*TINY, f"run_dir={tmp_path}", f"ckpt_path={tmp_path}/nope.ckpt"))


@pytest.mark.slow
def test_cli_run_writes_metrics_and_checkpoint(tmp_path):
    cmd = [sys.executable, "train.py", "debug=fast", "trainer.max_steps=4", "run_name=cli", f"output_root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "cli"
    steps = [int(r["step"]) for r in read_rows(run_dir / "metrics.csv") if r["train/loss"]]
    assert steps == [0, 1, 2, 3]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "final val/loss" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [("model.kv_heads=3", "model.kv_heads (3) must divide model.heads (8)"), ("model=gpt9", "error: train.py: model=gpt9: no such option; choose from gqa_125m")],
)
def test_cli_bad_config_exits_with_the_message(tmp_path, override, message):
    cmd = [sys.executable, "train.py", override, "run_name=bad", f"output_root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_bf16_mixed_with_a_fused_optimizer_and_gradient_clipping(tmp_path):
    """The GPU default (bf16-mixed, fused AdamW, clipping) on CPU: clipping must not be refused."""
    cfg = compose(*TINY, f"run_dir={tmp_path}", "trainer.precision=bf16-mixed", "optim.optimizer.fused=true", "trainer.gradient_clip_val=0.5")
    val_loss = train(cfg)
    assert val_loss is not None and val_loss < 5.5


def test_peak_flops_gives_mfu_where_lightning_knows_no_peak(tmp_path):
    # The CPU has no entry in Lightning's table of devices: without peak_flops, no MFU is logged.
    from mgqa.lit.checkpoint import load_checkpoint
    from mgqa.model import ConfigError, MGQATransformer, ModelConfig

    short = (*TINY, "sample.max_new_tokens=0", "trainer.max_steps=4", "trainer.val_check_interval=4")
    train(compose(*short, f"run_dir={tmp_path / 'table'}"))
    assert not any(r.get("train/mfu") for r in read_rows(tmp_path / "table" / "metrics.csv"))
    train(compose(*short, f"run_dir={tmp_path / 'given'}", "callbacks.throughput.peak_flops=2e9"))
    timed = [r for r in read_rows(tmp_path / "given" / "metrics.csv") if r["train/tokens_per_s"]]
    assert timed and all(r["train/mfu"] for r in timed)
    state = load_checkpoint(tmp_path / "given" / "checkpoints" / "last.ckpt")
    config = ModelConfig.from_dict(state["hyper_parameters"]["model"])
    flops_per_token = MGQATransformer.from_config(config).training_flops_per_token(config.max_seq_len)
    for r in timed:  # MFU = tokens/s x FLOPs per token / peak
        assert float(r["train/mfu"]) == pytest.approx(float(r["train/tokens_per_s"]) * flops_per_token / 2e9, rel=1e-4)
    for bad in ("-5", "0", "fast"):
        with pytest.raises(ConfigError, match=rf"callbacks.throughput: peak_flops must be a device's peak FLOP/s .* got '?{bad}'?$"):
            train(compose(*short, f"run_dir={tmp_path / 'bad'}", f"callbacks.throughput.peak_flops={bad}"))
