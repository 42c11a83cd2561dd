"""``compile=true`` through the real training path: the compiled blocks train like eager ones."""

import csv

import pytest

from mgqa.lit.run import train
from tests.conftest import TINY, compose
from tests.lit.test_training import read_rows


def _losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [float(r["train/loss"]) for r in csv.DictReader(fh) if r["train/loss"]]


@pytest.mark.slow
def test_compiled_run_matches_eager(tmp_path, caplog):
    common = (*TINY, "trainer.max_steps=3", "trainer.val_check_interval=3", "sample.max_new_tokens=4")
    train(compose(*common, "compile=false", f"run_dir={tmp_path / 'eager'}"))
    caplog.clear()
    with caplog.at_level("INFO", logger="mgqa"):
        train(compose(*common, "compile=true", f"run_dir={tmp_path / 'compiled'}"))
    assert "torch.compile: 2 decoder blocks" in caplog.text
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-4)
    assert compiled[-1] < compiled[0]


def test_bad_compile_value_is_one_line(tmp_path):
    from mgqa.model import ConfigError

    with pytest.raises(ConfigError, match="compile must be auto, true or false, got 'yes'"):
        train(compose(*TINY, "compile=yes", f"run_dir={tmp_path}"))


@pytest.mark.slow
def test_compiled_run_resumes_exactly(tmp_path):
    """A compiled run resumed from a mid-run checkpoint logs the losses of the uninterrupted one:
    compiling in place keeps the parameter names, so checkpoints load either way."""
    common = (
        *TINY, "compile=true", "trainer.max_steps=6", "trainer.val_check_interval=6", "sample.max_new_tokens=0",
        "callbacks.latest_checkpoint.every_n_train_steps=3", "callbacks.latest_checkpoint.save_top_k=-1",
    )
    train(compose(*common, f"run_dir={tmp_path / 'full'}"))
    ckpt = tmp_path / "full" / "checkpoints" / "step000003.ckpt"
    assert ckpt.is_file()
    train(compose(*common, f"run_dir={tmp_path / 'resumed'}", f"ckpt_path={ckpt}"))
    full = {int(r["step"]): r["train/loss"] for r in read_rows(tmp_path / "full" / "metrics.csv") if r["train/loss"]}
    resumed = {int(r["step"]): r["train/loss"] for r in read_rows(tmp_path / "resumed" / "metrics.csv") if r["train/loss"]}
    assert sorted(resumed) == [3, 4, 5]
    assert {s: full[s] for s in resumed} == resumed  # the logged strings: bit for bit


def test_compile_mode_reaches_every_block_and_a_bad_one_is_one_line(tmp_path, monkeypatch, caplog):
    from mgqa.model import ConfigError, MGQATransformer

    given = []
    monkeypatch.setattr(MGQATransformer, "compile_blocks", lambda self, **options: given.append(options))
    short = (*TINY, "trainer.max_steps=1", "trainer.val_check_interval=1", "sample.max_new_tokens=0")
    with caplog.at_level("INFO", logger="mgqa"):
        train(compose(*short, "compile=true", "compile_mode=max-autotune-no-cudagraphs", f"run_dir={tmp_path / 'a'}"))
        train(compose(*short, "compile=true", f"run_dir={tmp_path / 'b'}"))
        train(compose(*short, "compile_mode=reduce-overhead", f"run_dir={tmp_path / 'c'}"))  # auto: off on the CPU
    assert given == [{"mode": "max-autotune-no-cudagraphs"}, {"mode": "default"}]
    assert "torch.compile: 2 decoder blocks (mode max-autotune-no-cudagraphs, compiled on the first step)" in caplog.text
    assert "compile_mode=reduce-overhead has no effect: compile=auto leaves the blocks uncompiled here" in caplog.text
    with pytest.raises(ConfigError, match="compile_mode must be one of default, max-autotune-no-cudagraphs, "
                                          "max-autotune, reduce-overhead; got 'fastest'"):
        train(compose(*TINY, "compile_mode=fastest", f"run_dir={tmp_path / 'bad'}"))
