"""Callbacks: throughput and MFU, the progress bar, checkpoint-on-signal, random-state checkpointing."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def _windows_in_batch(batch: Any) -> int:
    return int(batch[0].shape[0])


def _tokens_in_batch(batch: Any) -> int:
    return int(batch[0].numel())


class TrainingThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for (inputs, targets) token batches, logging

    - ``train/tokens_per_s``: tokens of all ranks per second;
    - ``train/mfu``: model FLOPs utilisation per device, from ``LanguageModel.flops_per_batch`` and
      the device's peak dense rate in the training precision (where Lightning knows the device);
    - ``train/peak_memory_gib``: the most GPU memory allocated so far (CUDA only).

    Rates cover the last ``window_size`` - 1 logging intervals (``trainer.log_every_n_steps``
    steps each). The GPU is synchronised at logging steps only, not after every step as
    Lightning's monitor does, so that the host keeps queueing work ahead of the GPU; for the same
    reason the rates are computed and logged (as host tensors: a Python number logged is copied to
    the GPU, which waits for it) at those steps only. The first
    ``warmup_steps`` optimizer steps of a fit (compilation, autotuning) are left out, and their
    time is logged once; validation time is left out too.
    """

    def __init__(self, window_size: int = 2, warmup_steps: int = 1) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 logging steps, got {window_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        super().__init__(batch_size_fn=_windows_in_batch, length_fn=_tokens_in_batch, window_size=window_size)
        self.warmup_steps = warmup_steps
        self._steps = 0
        self._flops_since_update = 0
        self._fresh = False  # rates updated since they were last logged

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # starts the training clock (``_t0s``)
        self._steps, self._flops_since_update = 0, 0

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING:
            return  # a training run reads training's throughput only
        self._samples[stage] += _windows_in_batch(batch)
        self._lengths[stage] += _tokens_in_batch(batch)
        self._batches[stage] += 1
        self._flops_since_update += int(getattr(pl_module, "flops_per_batch", None) or 0)
        at_step_end = not trainer.fit_loop._should_accumulate()
        warmup_over = at_step_end and self._steps + 1 == self.warmup_steps
        if not (at_step_end and (trainer._logger_connector.should_update_logs or warmup_over)):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # the time of work done, not queued
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=self._flops_since_update or None,
        )
        self._flops_since_update = 0
        self._fresh = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fit_loop._should_accumulate():
            return
        self._steps += 1
        if self._steps == self.warmup_steps and trainer.is_global_zero:
            seconds = time.perf_counter() - self._t0s[RunningStage.TRAINING]
            steps = "first step" if self.warmup_steps == 1 else f"first {self.warmup_steps} steps"
            rank_zero_info(
                f"{steps} took {seconds:.1f} s (warm-up, and compilation where compile is on; "
                "left out of train/tokens_per_s)"
            )
            self._start(trainer)  # the windows begin after the warm-up
            self._throughputs[RunningStage.TRAINING].update(time=0.0, batches=0, samples=0, lengths=0)
            self._fresh = False

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        stage = trainer.state.stage
        if stage != RunningStage.TRAINING or self._steps < self.warmup_steps or not self._fresh:
            return
        self._fresh = False
        metrics = self._throughputs[stage].compute()
        module = trainer.lightning_module
        if "device/items_per_sec" in metrics:
            tokens_per_s = metrics["device/items_per_sec"] * trainer.world_size
            module.log("train/tokens_per_s", torch.tensor(tokens_per_s), rank_zero_only=True)
        if "device/mfu" in metrics:
            module.log("train/mfu", torch.tensor(metrics["device/mfu"]), rank_zero_only=True)
        if trainer.strategy.root_device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
            module.log("train/peak_memory_gib", torch.tensor(peak), rank_zero_only=True)


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing ``train/loss`` read at each refresh.

    Lightning turns every value logged with ``prog_bar=True`` into a Python number after every
    batch, a read that waits for the GPU. The training loss is logged without it, and the bar
    reads it here, once per refresh (``refresh_rate`` steps).
    """

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["train/loss"] = round(float(loss), 3)
        return items


class SignalCheckpoint(L.Callback):
    """On SIGTERM or SIGINT (and SIGUSR1 outside SLURM), finish the current optimizer step, save
    ``last.ckpt`` and stop training cleanly. Also saves ``last.ckpt`` after the final optimizer
    step (``trainer.max_steps``), so a finished run can be continued with more steps.

    Both saves happen at the end of a training batch, the state Lightning resumes from exactly.
    Under SLURM with auto-requeue, SIGUSR1 is left to Lightning's own requeue handler.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.received: Optional[int] = None
        self.saved_at_step: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        signums = [signal.SIGTERM, signal.SIGINT]
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            signums.append(signal.SIGUSR1)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return  # only between optimizer steps: no half-accumulated gradients to lose
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if not final and not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        # A full checkpoint (optimizer, loops, callbacks) to resume from; saying so spares a log line per save.
        trainer.save_checkpoint(self.path, weights_only=False)
        # Stopping runs the epoch-end hooks; a step checkpoint written there would look like an
        # end-of-epoch state and resume at the next epoch. Mark this step as saved for the callbacks
        # that save on training steps or time; those that save on validation (the best by val/loss)
        # still see the validation that follows the final step or the stop.
        for callback in trainer.checkpoint_callbacks:
            if _saves_on_train_steps(callback):
                callback._last_global_step_saved = trainer.global_step
        if final:
            return
        self.saved_at_step = trainer.global_step
        trainer.should_stop = True
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        rank_zero_info(f"received {name}: saved {self.path} at step {trainer.global_step}; stopping")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


def _saves_on_train_steps(callback: Any) -> bool:
    """Whether a ``ModelCheckpoint`` saves every N training steps or on a timer (not at validation)."""
    return bool(getattr(callback, "_every_n_train_steps", 0)) or getattr(callback, "_train_time_interval", None) is not None


class ConfiguredLearningRate(L.Callback):
    """A resumed run trains at the configured ``optim.optimizer.lr``, not at the one stored with the
    optimizer and LR-schedule state: lowering the learning rate is the usual answer to a diverged run
    (see ``LanguageModel``'s update check). The schedule keeps its position; its base learning rate changes."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        lr = float(pl_module.hparams["optim"]["optimizer"]["lr"])
        stored = None
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                base = float(group.get("initial_lr", group["lr"]))
                if base != lr:
                    stored = base
                    group["lr"] *= lr / base  # the same point of the schedule, from the new base
                    group["initial_lr"] = lr
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        if stored is not None:
            rank_zero_info(f"resumed with optim.optimizer.lr={lr:g} (the checkpoint's was {stored:g})")


class FinalValidation(L.Callback):
    """Validate once after the final optimizer step, inside ``Trainer.fit``.

    ``Trainer.validate`` after ``fit`` cannot run an FSDP-wrapped model (Lightning re-wraps only the
    blocks and leaves the root's parameters sharded), so the final validation is part of the fit:
    stopping at the final step makes Lightning validate there, once, also when the step is a regular
    validation step. ``validated_at_step`` tells whether that happened.
    """

    def __init__(self) -> None:
        self.validated_at_step: Optional[int] = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches != 0:
            return
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_at_step = trainer.global_step


class RNGState(L.Callback):
    """Saves and restores the Python, NumPy and torch (CPU and CUDA) random states with each
    checkpoint, so dropout and sampling continue as in an uninterrupted run."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = {
            "python": _python_state_to_list(random.getstate()),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_states"] = state

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Restored here, after Lightning's own set-up has drawn any random numbers it needs.
        state = getattr(self, "_pending", None)
        if not state:
            return
        random.setstate(_python_state_from_list(state["python"]))
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self._pending = None


# RNG states as plain lists and tensors, which ``torch.load(weights_only=True)`` accepts.
def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _numpy_state_to_plain(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
