"""LightningModule: next-token cross-entropy on a ``MGQATransformer``."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from torchmetrics.aggregation import MeanMetric

from mgqa.model import ConfigError, MGQATransformer, ModelConfig

log = logging.getLogger("mgqa")


COMPILE_CHOICES = ("auto", True, False)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class LanguageModel(L.LightningModule):
    """Trains ``MGQATransformer`` on (inputs, targets) token batches.

    ``model`` holds ``ModelConfig`` fields (with ``num_tokens`` set); ``optim`` holds
    ``optimizer`` and ``scheduler`` configs with ``_target_`` and ``_partial_: true``. Both are
    plain data and are saved with checkpoints as hyperparameters.

    ``compile``: ``"auto"`` (on for CUDA, off elsewhere), ``True`` or ``False``: each decoder block
    is compiled with ``torch.compile`` in place (parameter names, and so checkpoints, unchanged).
    The loss runs uncompiled in chunks of rows (``MGQATransformer.loss``).

    ``nonfinite_loss``: ``{"action": "stop" | "skip", "max_skips": N}``. On a NaN/Inf loss, ``stop``
    raises ``NonFiniteLossError`` naming the step (no checkpoint is written, so the last good one
    stays); ``skip`` drops the batch's update, at most N times in a run, then stops; a skipped step
    logs its loss (NaN/Inf) and ``train/skipped_batches``. Weights made non-finite by an update
    (a finite loss can still give one, e.g. at a huge learning rate) stop the run in either mode,
    before any checkpoint holding them is written: a skipped batch cannot undo an applied update.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        tokenizer: Optional[dict[str, Any]] = None,
        nonfinite_loss: Optional[dict[str, Any]] = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if compile not in COMPILE_CHOICES:
            raise ConfigError(f"compile must be auto, true or false, got {compile!r}")
        self.compile_mode = compile
        self.compiled = False
        self.model_config = ModelConfig.from_dict(dict(model))
        self.model = MGQATransformer.from_config(self.model_config)
        self.flops_per_batch: Optional[int] = None  # read by ThroughputMonitor for MFU
        self._flops_per_token: dict[int, int] = {}  # by sequence length
        self._update_check: Optional[tuple[int, torch.Tensor]] = None  # (step, weights finite) on the device
        self.val_loss = MeanMetric()
        guard = {"action": "stop", "max_skips": 3, **(nonfinite_loss or {})}
        if guard["action"] not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss.action must be 'stop' or 'skip', got {guard['action']!r}")
        self.nonfinite_action, self.max_nonfinite_skips = guard["action"], int(guard["max_skips"])
        self.nonfinite_skips = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def configure_model(self) -> None:
        """Compile the blocks once (Lightning calls this before wrapping the model for DDP/FSDP)."""
        if self.compiled:
            return
        on_cuda = self.trainer.strategy.root_device.type == "cuda"
        if self.compile_mode is True or (self.compile_mode == "auto" and on_cuda):
            self.model.compile_blocks()
            self.compiled = True
            log.info("torch.compile: %d decoder blocks (compiled on the first step)", len(self.model.attn_layers.blocks))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch  # (B, N), (B, N)
        return self.model.loss(inputs, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        inputs = batch[0]  # (B, N)
        seq_len = inputs.shape[1]
        if seq_len not in self._flops_per_token:  # counts the parameters: once, not every step
            self._flops_per_token[seq_len] = self.model.training_flops_per_token(seq_len)
        self.flops_per_batch = inputs.numel() * self._flops_per_token[seq_len]
        loss = self._loss(batch)
        # Every rank takes the same decision, so DDP never waits on a rank that skipped backward.
        nonfinite = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        self._check_last_update()  # its flag was computed before this forward: reading it costs no wait
        if nonfinite:
            return self._on_nonfinite(loss, batch_idx)
        self.log("train/loss", loss, prog_bar=True)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            self.log("train/lr", schedulers.get_last_lr()[0], prog_bar=False)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # One fused pass over the weights, left on the device: the flag is read after the next
        # forward's loss check (which waits for the GPU anyway) or before a checkpoint is written,
        # so the check adds no host sync to a step.
        params = [p for p in self.parameters() if p.is_floating_point() and p.numel() > 0]
        if params:
            finite = torch.stack(torch._foreach_norm(params)).isfinite().all()
            self._update_check = (self.global_step, finite)

    def _check_last_update(self) -> None:
        """Stop if the last optimizer step left NaN or infinity in the weights (on any rank)."""
        if self._update_check is None:
            return
        step, finite = self._update_check
        self._update_check = None
        if not self.trainer.strategy.reduce_boolean_decision(not bool(finite), all=False):
            return
        names = [n for n, p in self.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        where = ", ".join(names[:3]) if names else "on another rank"
        raise NonFiniteLossError(
            f"the update of step {step} left NaN or infinity in the weights ({where}) although the loss "
            "was finite; nothing of this step was saved. Resume with a lower optim.optimizer.lr from "
            "ckpt_path=last, or from an earlier checkpoints/step*.ckpt if the last one's weights are already huge"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_last_update()  # before any file holding this step's weights is written

    def _on_nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        where = f"at step {self.global_step} (batch {batch_idx} of epoch {self.current_epoch})"
        if self.nonfinite_action == "skip" and self.nonfinite_skips < self.max_nonfinite_skips:
            self.nonfinite_skips += 1
            # Logged as what it was: the step's non-finite loss and the running count of skipped
            # batches (a key left unlogged in a step would repeat its previous value in metrics.csv).
            self.log("train/loss", loss.detach(), prog_bar=True)
            self.log("train/skipped_batches", float(self.nonfinite_skips))
            log.warning(
                "non-finite training loss (%s) %s: batch skipped (%d of at most %d)",
                loss.item(), where, self.nonfinite_skips, self.max_nonfinite_skips,
            )
            return None
        raise NonFiniteLossError(
            f"training loss is {loss.item()} {where}; stopping. Checkpoints on disk hold only finite states: "
            "resume with ckpt_path=last (perhaps with a lower optim.optimizer.lr), or set nonfinite_loss.action=skip"
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=batch[0].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # MeanMetric already reduced over ranks: every rank holds the same value.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss.clamp(max=50.0)), sync_dist=True)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float] = None, gradient_clip_algorithm: Optional[str] = None
    ) -> None:
        """Without a loss scaler (fp32, bf16) gradients are true gradients: clip them directly, which
        also works for fused optimizers (Lightning's precision plugin refuses those)."""
        if not gradient_clip_val:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

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
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if self.device.type == "cuda" and optim_cfg["optimizer"].get("fused") is None and scaler is None:
            extra["fused"] = True  # with fp16 loss scaling, gradient clipping needs the unfused step
        optimizer = instantiate(optim_cfg["optimizer"])(groups, **extra)
        scheduler_cfg = optim_cfg.get("scheduler")
        if not scheduler_cfg:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the LR schedule needs a finite trainer.max_steps (or max_epochs)")
        scheduler = instantiate(scheduler_cfg)(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
