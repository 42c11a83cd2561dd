"""The first hour: paths that don't depend on the launch directory, the sample prompt, debug presets, tags.

A run launched from another directory, with a quiet console: tests/lit/test_sweep_summary.py."""

import csv

import pytest

from mgqa.lit.run import build, train
from tests.conftest import ROOT, compose

# A tiny model for the presets that keep the chosen model (all but debug=fast).
TINY_MODEL = ("model.dim=64", "model.depth=2", "model.heads=4", "model.kv_heads=2", "model.max_seq_len=64",
              "data.batch_size=4", "trainer.enable_progress_bar=false", "sample.max_new_tokens=5")


def test_paths_are_absolute_and_follow_the_repository_or_MGQA_ROOT(tmp_path, monkeypatch):
    cfg = compose()
    assert cfg.paths.root_dir == str(ROOT)
    assert cfg.data.files == f"{ROOT}/data/shakespeare/*.txt"
    assert cfg.output_root == f"{ROOT}/outputs"
    assert compose("data=shakespeare_bpe").data.tokenizer == f"{ROOT}/data/tokenizers/shakespeare-bpe-2k.json"
    assert compose("debug=limit").output_root == f"{ROOT}/outputs/debug"
    monkeypatch.setenv("MGQA_ROOT", str(tmp_path))
    cfg = compose()
    assert (cfg.paths.data_dir, cfg.output_root) == (f"{tmp_path}/data", f"{tmp_path}/outputs")


def test_the_sample_prompt_belongs_to_the_data_config():
    prompts = {name: compose(f"data={name}").sample.prompt for name in ("shakespeare", "tinystories", "fineweb_edu")}
    assert prompts == {"shakespeare": "ROMEO.\n", "tinystories": "Once upon a time", "fineweb_edu": "The history of"}
    assert compose("sample.prompt=Hello").sample.prompt == "Hello"


@pytest.mark.parametrize("preset", ["fast", "overfit", "limit", "profile"])
def test_debug_presets_log_locally_under_their_own_folder(preset):
    cfg = compose(f"debug={preset}")
    assert list(cfg.logger) == ["csv"] and cfg.output_root == f"{ROOT}/outputs/debug"
    # A remote logger asked for on the command line is the user's explicit choice, and wins.
    assert "wandb" in compose(f"debug={preset}", "logger=wandb").logger


def test_debug_overfit_repeats_the_same_batches_every_epoch(tmp_path):
    def first_batches(*overrides):
        _, datamodule, trainer = build(compose(*TINY_MODEL, f"run_dir={tmp_path}", *overrides))
        datamodule.trainer = trainer
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        return [[batch[0] for _, batch in zip(range(2), loader)] for _epoch in range(2)]

    first, second = first_batches("debug=overfit")
    assert all((a == b).all() for a, b in zip(first, second))
    first, second = first_batches("debug=limit")  # shuffled otherwise: another order each epoch
    assert not all((a == b).all() for a, b in zip(first, second))


def test_debug_limit_runs_short_epochs(tmp_path):
    train(compose("debug=limit", *TINY_MODEL, "trainer.limit_train_batches=2", "trainer.max_steps=4",
                  f"run_dir={tmp_path}"))
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps_by_epoch = {}
    for r in rows:
        if r["train/loss"]:
            steps_by_epoch.setdefault(int(float(r["epoch"])), []).append(int(r["step"]))
    assert steps_by_epoch == {0: [0, 1], 1: [2, 3]}  # limit_train_batches batches per epoch
    assert sum(1 for r in rows if r["val/loss"]) >= 2  # validated at the end of each epoch


def test_debug_profile_writes_a_trace_to_the_run_directory(tmp_path):
    train(compose("debug=profile", *TINY_MODEL, "trainer.max_steps=5", "trainer.val_check_interval=5",
                  f"run_dir={tmp_path}"))
    traces = sorted(p.name for p in (tmp_path / "profile").glob("*.pt.trace.json"))
    assert any("training_step" in name for name in traces), traces
    table = (tmp_path / "profile" / "fit-ops.txt").read_text()
    assert "run_training_batch" in table and "aten::mm" in table  # the recorded training steps, op by op


def test_tags_and_task_name_reach_every_logger(tmp_path):
    from mgqa.lit.loggers import wandb_logger  # noqa: PLC0415

    cfg = compose("debug=fast", "logger=tensorboard", "trainer.max_steps=1", "trainer.enable_progress_bar=false",
                  "sample.max_new_tokens=0", "tags=[gqa,baseline]", f"run_dir={tmp_path}")
    train(cfg)
    for hparams in (tmp_path / "hparams.yaml", tmp_path / "tensorboard" / "hparams.yaml"):  # CSV, TensorBoard
        text = hparams.read_text()
        assert "task_name: train" in text and "- gqa\n- baseline" in text, text
    wandb_cfg = compose("logger=wandb", "tags=[gqa]", f"run_dir={tmp_path}").logger.wandb
    assert (list(wandb_cfg.tags), wandb_cfg.job_type) == (["gqa"], "train")
    logger = wandb_logger(str(tmp_path), tags=wandb_cfg.tags, job_type=wandb_cfg.job_type, mode="disabled")
    assert (logger._wandb_init["tags"], logger._wandb_init["job_type"]) == (["gqa"], "train")
