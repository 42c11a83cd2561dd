"""Lightning saves the stateful train loader in checkpoints: a resumed run sees exactly the batches
the uninterrupted run saw (workers > 0, shuffling on, across epoch boundaries)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from mgqa.lit.datamodule import TextDataModule
from mgqa.lit.module import LanguageModel
from tests.conftest import TINY, compose
from tests.data.conftest import write_docs

pytestmark = pytest.mark.timeout(300)


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.inputs: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.inputs[trainer.global_step] = batch[0].clone()


def fit(files, ckpt_dir, max_steps, ckpt_path=None):
    cfg = compose(*TINY, "model.max_seq_len=16", "model.dim=32", "model.depth=1")
    model = OmegaConf.to_container(cfg.model, resolve=True) | {"num_tokens": 257}
    module = LanguageModel(model=model, optim=OmegaConf.to_container(cfg.optim, resolve=True))
    data = TextDataModule(files=files, seq_len=16, batch_size=4, num_workers=2, shuffle_buffer=30, val_fraction=0.2, seed=11)
    recorder = BatchRecorder()
    every_3 = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step{step}", auto_insert_metric_name=False, every_n_train_steps=3, save_top_k=-1
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, callbacks=[recorder, every_3], logger=False, enable_progress_bar=False,
        enable_model_summary=False, val_check_interval=5, limit_val_batches=2, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder.inputs, len(data.train_dataloader())


def test_resume_from_a_mid_epoch_checkpoint_continues_with_the_next_batch(tmp_path):
    docs = [f"scene {i}: " + "".join(chr(97 + (i * 7 + k) % 26) for k in range(60 + 10 * i)) for i in range(8)]
    files = write_docs(tmp_path / "docs", docs)
    full, per_epoch = fit(files, tmp_path / "full", max_steps=14)
    assert 3 < per_epoch < 12  # the run crosses at least one epoch boundary after the checkpoint
    assert not torch.equal(full[0], full[per_epoch])  # shuffled differently in the next epoch
    ckpt = tmp_path / "full" / "step3.ckpt"
    assert "combined_loader" in torch.load(ckpt, map_location="cpu", weights_only=False)["loops"]["fit_loop"]["state_dict"]
    resumed, _ = fit(files, tmp_path / "resumed", max_steps=14, ckpt_path=str(ckpt))
    assert sorted(resumed) == list(range(3, 14))
    for step in resumed:
        assert torch.equal(resumed[step], full[step]), f"step {step} saw a different batch after resume"
