"""Finding and loading trained checkpoints: the best of a run, refusals, tokenizers named by content."""

import os
import shutil

import pytest
import torch

from mgqa.data import build_tokenizer
from mgqa.lit.checkpoint import CheckpointError, same_tokenizer
from mgqa.lit.trained import best_checkpoint, load_trained, resolve_checkpoint
from mgqa.model import ConfigError, MGQATransformer, ModelConfig
from tests.conftest import ROOT

BPE = ROOT / "data/tokenizers/shakespeare-bpe-2k.json"


def fake_run(run_dir, scores):
    """A run directory with best-step<N>.ckpt files whose newest records every kept file's score."""
    cfg = ModelConfig(dim=16, depth=1, heads=2, num_tokens=257, max_seq_len=8)
    model = MGQATransformer.from_config(cfg)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    paths = [run_dir / "checkpoints" / f"best-step{step}.ckpt" for step in scores]
    best_k = {str(p): score for p, score in zip(paths, scores.values())}
    for i, (path, step) in enumerate(zip(paths, scores)):
        path.parent.mkdir(parents=True, exist_ok=True)
        callbacks = {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_k_models": best_k}} if i == len(paths) - 1 else {}
        torch.save({"state_dict": state, "global_step": step, "callbacks": callbacks,
                    "hyper_parameters": {"model": cfg.to_dict(), "tokenizer": {"name": "byte", "vocab_size": 257}}}, path)  # fmt: skip
        os.utime(path, ns=(i * 10**9, i * 10**9))
    return model


def test_run_name_picks_the_lowest_validation_loss_and_loads_it(tmp_path):
    model = fake_run(tmp_path / "run", {10: 2.5, 20: 2.1, 30: 2.3})
    assert best_checkpoint(tmp_path / "run").name == "best-step20.ckpt"
    shutil.move(tmp_path / "run", tmp_path / "moved")  # scores are matched by file name too
    assert best_checkpoint(tmp_path / "moved").name == "best-step20.ckpt"
    loaded = load_trained(run_name="moved", output_root=str(tmp_path), device="cpu")
    assert loaded.step == 20 and loaded.tokenizer.name == "byte"
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


def test_wrong_checkpoint_arguments_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="give ckpt_path=<file or run directory> or run_name"):
        resolve_checkpoint(None, None, "outputs")
    with pytest.raises(FileNotFoundError, match="run directory .* does not exist"):
        resolve_checkpoint(None, "nope", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        resolve_checkpoint(str(tmp_path / "empty"), None, "outputs")
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="consolidate_checkpoint"):
        resolve_checkpoint(str(sharded), None, "outputs")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="carries no model hyperparameters"):
        load_trained(str(tmp_path / "foreign.ckpt"), device="cpu")
    with pytest.raises(ConfigError, match="device='tpu' is unknown"):
        load_trained(str(tmp_path / "foreign.ckpt"), device="tpu")


def test_a_tokenizer_is_the_same_whatever_path_loaded_it(tmp_path):
    copy = tmp_path / "renamed.json"
    shutil.copy(BPE, copy)
    a, b = build_tokenizer(str(BPE)).state(), build_tokenizer(str(copy)).state()
    assert a["name"] != b["name"] and same_tokenizer(a, b)
    assert not same_tokenizer(a, build_tokenizer("byte").state())
    older = {k: v for k, v in a.items() if k != "sha256"}  # states saved before the hash was added
    assert same_tokenizer(older, a)
