"""LightningModule: next-token cross-entropy on a ``MGQATransformer``."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics.aggregation import MeanMetric

from mgqa.model import MGQATransformer, ModelConfig


class LanguageModel(L.LightningModule):
    """Trains ``MGQATransformer`` on (inputs, targets) token batches.

    ``model`` holds ``ModelConfig`` fields (with ``num_tokens`` set); ``optim`` holds
    ``optimizer`` and ``scheduler`` configs with ``_target_`` and ``_partial_: true``. Both are
    plain data and are saved with checkpoints as hyperparameters.
    """

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], tokenizer: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(dict(model))
        self.model = MGQATransformer.from_config(self.model_config)
        self.val_loss = MeanMetric()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch  # (B, N), (B, N)
        logits = self.model(inputs)  # (B, N, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            self.log("train/lr", schedulers.get_last_lr()[0], prog_bar=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=batch[0].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=50.0)))

    def configure_optimizers(self) -> Any:
        optim_cfg = self.hparams.optim
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            # Matrices decay; norms, biases and (possibly tied) embeddings don't.
            (decay if param.dim() >= 2 and "emb" not in name else no_decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        extra = {}
        if self.device.type == "cuda" and optim_cfg["optimizer"].get("fused") is None:
            extra["fused"] = True
        optimizer = instantiate(optim_cfg["optimizer"])(groups, **extra)
        scheduler_cfg = optim_cfg.get("scheduler")
        if not scheduler_cfg:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the LR schedule needs a finite trainer.max_steps (or max_epochs)")
        scheduler = instantiate(scheduler_cfg)(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
