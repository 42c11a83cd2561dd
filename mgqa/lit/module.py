"""LightningModule: next-token cross-entropy on a ``MGQATransformer``."""

from __future__ import annotations

import collections
import logging
import math
from typing import Any, Callable, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from torchmetrics.aggregation import MeanMetric

from mgqa.lit.step_verdict import StepVerdict, clipping_scale, to_host
from mgqa.model import ConfigError, MGQATransformer, ModelConfig

log = logging.getLogger("mgqa")


COMPILE_CHOICES = ("auto", True, False)
# torch.compile's modes: "max-autotune*" also tunes Triton matrix-product templates against cuBLAS,
# "reduce-overhead" and "max-autotune" replay each block as a CUDA graph.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class LanguageModel(L.LightningModule):
    """Trains ``MGQATransformer`` on (inputs, targets) token batches.

    ``model`` holds ``ModelConfig`` fields (with ``num_tokens`` set); ``optim`` holds
    ``optimizer`` and ``scheduler`` configs with ``_target_`` and ``_partial_: true``. Both are
    plain data and are saved with checkpoints as hyperparameters.

    ``compile``: ``"auto"`` (on for CUDA, off elsewhere), ``True`` or ``False``: each decoder block
    is compiled with ``torch.compile`` in place (parameter names, and so checkpoints, unchanged).
    The loss runs uncompiled in chunks of rows (``MGQATransformer.loss``). ``compile_mode`` is
    ``torch.compile``'s ``mode`` for the blocks (``COMPILE_MODES``).

    ``nonfinite_loss``: ``{"action": "stop" | "skip", "max_skips": N}``. On a NaN/Inf loss, ``stop``
    raises ``NonFiniteLossError`` naming the step (no checkpoint is written, so the last good one
    stays); ``skip`` drops the batch's update, at most N times in a run, then stops; a skipped step
    logs its loss (NaN/Inf) and ``train/skipped_batches``. Weights made non-finite by an update
    (a finite loss can still give one, e.g. at a huge learning rate) stop the run in either mode,
    before any checkpoint holding them is written: a skipped batch cannot undo an applied update.
    The weights are checked where the run waits anyway, not after every update: when a loss or
    gradient is non-finite (what non-finite weights give the next step), before every checkpoint,
    and when training ends.

    With a fused optimizer (AdamW's default) on one device or under DDP, no step waits for the
    device. The optimizer's kernel skips the update of a step whose loss or gradient norm is not
    finite (``found_inf``, as for a loss scaler) and applies gradient clipping (``grad_scale``). The
    verdict is copied to the host behind the step; the host acts on it (stops, or counts the skip)
    ``verdict_lag`` steps later, when the copy has long landed, and always before a checkpoint is
    written. A logging step's metrics travel with its verdict, and its row is written when the
    verdict is read, so logging does not wait for the device either. Other optimizers and strategies
    check the loss before the backward pass, which waits for the forward pass every step, and log
    each row at its step.
    """

    # Steps the host queues ahead of the last verdict it has read: a run told to stop on a
    # non-finite step stops this many steps after it. The skipped update was never applied,
    # and checkpoints wait for every verdict, so the lag loses nothing.
    verdict_lag = 2

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        tokenizer: Optional[dict[str, Any]] = None,
        nonfinite_loss: Optional[dict[str, Any]] = None,
        compile: bool | str = False,
        compile_mode: str = "default",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if compile not in COMPILE_CHOICES:
            raise ConfigError(f"compile must be auto, true or false, got {compile!r}")
        if compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}; got {compile_mode!r}")
        self.compile_choice, self.compile_mode = compile, compile_mode
        self.compiled = False
        self.model_config = ModelConfig.from_dict(dict(model))
        self.model = MGQATransformer.from_config(self.model_config)
        self.flops_per_batch: Optional[int] = None  # read by ThroughputMonitor for MFU
        self._flops_per_token: dict[int, int] = {}  # by sequence length
        self._verdict_on_device = False  # decided when fitting starts (class docstring)
        self._step_verdict: Optional[StepVerdict] = None  # the step being computed
        self._pending: collections.deque[StepVerdict] = collections.deque()  # steps done, verdict not read
        self._open_row: Optional[StepVerdict] = None  # the logging step just done, its row not yet written
        self._skipped: Optional[torch.Tensor] = None  # steps skipped so far (device), for the log
        self._float_params: list[torch.Tensor] = []  # listed when fitting starts
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
        if self.compile_choice is True or (self.compile_choice == "auto" and on_cuda):
            self.model.compile_blocks(mode=self.compile_mode)
            self.compiled = True
            mode = "" if self.compile_mode == "default" else f"mode {self.compile_mode}, "
            log.info("torch.compile: %d decoder blocks (%scompiled on the first step)", len(self.model.attn_layers.blocks), mode)
        elif self.compile_mode != "default":
            log.info("compile_mode=%s has no effect: compile=%s leaves the blocks uncompiled here",
                     self.compile_mode, self.compile_choice)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch  # (B, N), (B, N)
        return self.model.loss(inputs, targets)

    def on_train_start(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy  # noqa: PLC0415

        optimizers = self.trainer.optimizers
        self._verdict_on_device = (
            self.automatic_optimization
            and len(optimizers) == 1
            # Fused Adam, AdamW and SGD read found_inf and grad_scale inside their kernel.
            and getattr(optimizers[0], "_step_supports_amp_scaling", False)
            and getattr(self.trainer.precision_plugin, "scaler", None) is None
            # After DDP's all-reduce every rank holds the whole gradient, so every rank computes the
            # same norm and takes the same decision; sharded gradients would need a reduction first.
            and type(self.trainer.strategy) in (SingleDeviceStrategy, DDPStrategy)
        )
        self._step_verdict = None
        self._pending.clear()
        self._open_row = None
        # The weights the finiteness check reads: fixed for the fit, so listed once.
        self._float_params = [p for p in self.parameters() if p.is_floating_point() and p.numel() > 0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        inputs = batch[0]  # (B, N)
        seq_len = inputs.shape[1]
        if seq_len not in self._flops_per_token:  # counts the parameters: once, not every step
            self._flops_per_token[seq_len] = self.model.training_flops_per_token(seq_len)
        self.flops_per_batch = inputs.numel() * self._flops_per_token[seq_len]
        loss = self._loss(batch)
        if self._verdict_on_device:
            return self._training_step_without_wait(loss, batch_idx)
        # Every rank takes the same decision, so DDP never waits on a rank that skipped backward.
        nonfinite = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        if nonfinite:
            self._check_weights(self.global_step)  # non-finite weights are the likeliest cause
            return self._on_nonfinite(loss, batch_idx)
        self._log_step(loss)
        return loss

    def _log_step(self, loss: torch.Tensor, skipped: Optional[torch.Tensor] = None) -> None:
        """The step's loss, learning rate and (``skip`` mode) skipped-step count, at logging steps.

        Values logged at other steps are never written, and each ``self.log`` call costs host time,
        which a step bound by the host's kernel launches cannot spare.
        """
        if not self.trainer._logger_connector.should_update_logs:
            return
        self.log("train/loss", loss)  # shown by the progress bar (LossProgressBar), which reads it at its refreshes
        if skipped is not None:
            self.log("train/skipped_batches", skipped)
        for name, value in self._host_values().items():
            # As a host tensor: Lightning would copy a Python number to the GPU, a copy that waits for it.
            self.log(name, torch.tensor(value))

    def _host_values(self) -> dict[str, float]:
        """The step's metrics known on the host: the learning rate."""
        schedulers = self.lr_schedulers()
        return {"train/lr": schedulers.get_last_lr()[0]} if schedulers is not None else {}

    def add_to_step_row(self, fill: Callable[[], dict[str, Any]]) -> bool:
        """Write ``fill()``'s values in the row of the logging step just done, when its verdict is read.

        For callbacks logging at a logging step's end (the rates): ``fill`` runs a few steps later,
        when what it reads on the device has long been done. False where the row is logged at its
        step (no verdict on the device, or the row already written): the caller logs the values itself.
        """
        if self._open_row is None or self._open_row.row is None:
            return False
        self._open_row.fills.append(fill)
        return True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After every callback's on_train_batch_end: the step's row can take no more values.
        verdict, self._open_row = self._open_row, None
        if verdict is not None and verdict.row is not None and verdict.values is not None:
            self._write_row(verdict)  # its verdict was read while the step's callbacks ran

    def _write_row(self, verdict: StepVerdict) -> None:
        """Log a logging step's row to every logger at its own step, and show its loss in the bar."""
        row, verdict.row = {**verdict.row, **dict(zip(verdict.logged, verdict.values))}, None
        for fill in verdict.fills:
            row.update(fill())
        self.trainer._logger_connector.log_metrics({**row, "epoch": verdict.epoch}, step=verdict.step)
        self.trainer.callback_metrics.update({name: torch.tensor(value) for name, value in row.items()})

    def _training_step_without_wait(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self._read_verdicts(wait=False)
        value = loss.detach()
        finite = torch.isfinite(value)
        verdict = self._step_verdict
        if verdict is None:
            self._step_verdict = verdict = StepVerdict(self.global_step, batch_idx, self.current_epoch, value, finite)
        else:  # another batch of an accumulated step
            verdict.loss = torch.where(verdict.loss_finite, value, verdict.loss)
            verdict.loss_finite = verdict.loss_finite & finite
        if self.nonfinite_action == "skip" and self._skipped is None:
            self._skipped = torch.zeros((), device=value.device)
        return loss  # logged with the verdict (optimizer_step)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        verdict = self._step_verdict  # set by the training step only when the verdict stays on the device
        if verdict is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros((), device=self.device)
        verdict.grad_norm = norm
        # Non-zero: the fused kernel leaves the weights and the optimizer state (step count included)
        # as they are.
        found_inf = (~(verdict.loss_finite & torch.isfinite(norm))).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.trainer.world_size > 1:
            # The maximum over ranks, so that no rank steps without the others. Queued like the
            # gradients' all-reduce (the strategy's reduce would add a barrier, a host wait).
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX)
        optimizer.found_inf = found_inf
        optimizer.grad_scale = None  # configure_gradient_clipping sets it when clipping by norm

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        verdict, self._step_verdict = self._step_verdict, None
        if verdict is not None:
            optimizer = self.trainer.optimizers[0]
            found_inf = optimizer.found_inf
            optimizer.found_inf = optimizer.grad_scale = None
            if self._skipped is not None:
                self._skipped = self._skipped + found_inf
            values = [found_inf]  # already 0.0 or 1.0
            if self.trainer._logger_connector.should_update_logs:
                logged = {"train/loss": verdict.loss, "train/grad_norm": verdict.grad_norm}
                if self._skipped is not None:
                    logged["train/skipped_batches"] = self._skipped
                verdict.row, verdict.logged = self._host_values(), tuple(logged)
                values += logged.values()
                self._open_row = verdict
            verdict.flags, verdict.ready = to_host(torch.stack([v.float() for v in values]))
            self._pending.append(verdict)

    def _check_weights(self, step: int) -> None:
        """Stop if the weights hold NaN or infinity (on any rank). One pass over them and a host wait:
        called only where the run waits anyway, on every rank at the same point.

        Not after every update: weights made non-finite at step n make step n + 1's loss non-finite,
        which is checked there, and a checkpoint is checked before it is written. That spares every
        step a read of all the weights.
        """
        if not self._float_params:
            return
        finite = torch.stack(torch._foreach_norm(self._float_params)).isfinite().all()
        if not self.trainer.strategy.reduce_boolean_decision(not bool(finite), all=False):
            return
        names = [n for n, p in self.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        where = ", ".join(names[:3]) if names else "on another rank"
        raise NonFiniteLossError(
            f"an update left NaN or infinity in the weights ({where}) by step {step}, although its loss was "
            "finite; no checkpoint holds them. Resume with a lower optim.optimizer.lr from ckpt_path=last, or "
            "from an earlier checkpoints/step*.ckpt if the last one's weights are already huge"
        )

    def _read_verdicts(self, wait: bool) -> None:
        """Act on the verdicts of finished steps, oldest first: stop, or count a skipped step.

        Without ``wait``, a verdict copied asynchronously is read once more than ``verdict_lag``
        steps are pending, by when its copy has long landed.
        """
        while self._pending:
            verdict = self._pending[0]
            if verdict.ready is not None:
                # At a fixed distance, not as soon as the copy lands: every DDP rank then acts on a
                # step at the same point, and none is left in a collective waiting for one that stopped.
                if not wait and len(self._pending) <= self.verdict_lag:
                    return
                verdict.ready.synchronize()
            self._pending.popleft()
            skipped, *verdict.values = verdict.flags.tolist()
            # The row of the step still ending (a checkpoint saved by its callbacks) waits for their
            # values (on_train_batch_end); a row is written before any stop, so a NaN step's is kept.
            if verdict.row is not None and (verdict is not self._open_row or skipped):
                self._write_row(verdict)
            if not skipped:
                continue
            # Every rank skipped this step (found_inf is reduced over ranks), so every rank checks here.
            self._check_weights(verdict.step)
            where = f"at step {verdict.step} (batch {verdict.batch_idx} of epoch {verdict.epoch})"
            if bool(verdict.loss_finite):
                self._skip_or_stop(f"gradient norm is {float(verdict.grad_norm)} {where} (the loss was finite)")
            else:
                self._skip_or_stop(f"training loss is {float(verdict.loss)} {where}")

    def _skip_or_stop(self, what: str) -> None:
        """Count a skipped update (``skip``, at most ``max_skips`` times) or raise ``NonFiniteLossError``."""
        if self.nonfinite_action == "skip" and self.nonfinite_skips < self.max_nonfinite_skips:
            self.nonfinite_skips += 1
            log.warning("%s: its update was skipped (%d of at most %d)", what, self.nonfinite_skips, self.max_nonfinite_skips)
            return
        raise NonFiniteLossError(
            f"{what}; stopping. Its update was not applied and checkpoints on disk hold only finite states: "
            "resume with ckpt_path=last (perhaps with a lower optim.optimizer.lr), or set nonfinite_loss.action=skip"
        )

    def _settle(self) -> None:
        """Act on every pending verdict, then check the weights: what stands now is finite."""
        self._read_verdicts(wait=True)
        self._check_weights(self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._settle()  # before any file holding this step's weights is written

    def on_train_end(self) -> None:
        self._settle()  # the last steps'

    def _on_nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        self._skip_or_stop(f"training loss is {loss.item()} at step {self.global_step} (batch {batch_idx} of epoch {self.current_epoch})")
        # Skipped. Logged as what it was: the step's non-finite loss and the running count of skipped
        # batches (a key left unlogged in a step would repeat its previous value in metrics.csv).
        self._log_step(loss.detach(), torch.tensor(float(self.nonfinite_skips)))
        return None

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
        verdict = self._step_verdict
        if verdict is not None and gradient_clip_algorithm != "value":
            # Applied by the fused kernel as it reads each gradient: no pass over them of its own.
            optimizer.grad_scale = clipping_scale(verdict.grad_norm, gradient_clip_val)
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
        if self.device.type in ("cuda", "cpu") and optim_cfg["optimizer"].get("fused") is None and scaler is None:
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
