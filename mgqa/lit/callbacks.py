"""Callbacks: throughput and MFU, the progress bar, checkpoint-on-signal, random-state checkpointing."""

from __future__ import annotations

import math
import random
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only


def _windows_in_batch(batch: Any) -> int:
    return int(batch[0].shape[0])


def _tokens_in_batch(batch: Any) -> int:
    return int(batch[0].numel())


class _HostEvent:
    """``torch.cuda.Event``'s timing interface on the host's clock: for CPU runs, whose work is done
    when it is queued."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.time = 0.0

    def record(self) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.time - self.time) * 1e3  # milliseconds, as CUDA's


class _TrainingClock:
    """Seconds of training, validation left out, on the GPU's own timeline (CUDA events) or the host's.

    ``mark`` records an event in stream order; ``seconds`` reads it once the GPU has passed it.
    Read a few steps later, that costs no wait, so the host keeps queueing work ahead of the GPU
    at logging steps too. ``event`` makes the events: ``torch.cuda.Event`` or ``_HostEvent``.
    """

    def __init__(self, event: Any) -> None:
        self._event = event
        self._origin = self._record()
        self._pauses: list[tuple[Any, Any]] = []  # (start, end) of each validation, in stream order
        self._pause_start: Any = None

    def _record(self) -> Any:
        event = self._event(enable_timing=True)
        event.record()
        return event

    def mark(self) -> tuple[Any, int]:
        return self._record(), len(self._pauses)

    def seconds(self, mark: tuple[Any, int]) -> float:
        event, pauses = mark
        event.synchronize()  # long passed where the row is written a few steps later
        paused = sum(start.elapsed_time(end) for start, end in self._pauses[:pauses])
        return (self._origin.elapsed_time(event) - paused) / 1e3

    def pause(self) -> None:
        self._pause_start = self._record()

    def resume(self) -> None:
        if self._pause_start is not None:
            self._pauses.append((self._pause_start, self._record()))
            self._pause_start = None


class TrainingThroughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` for (inputs, targets) token batches, logging

    - ``train/tokens_per_s``: tokens of all ranks per second;
    - ``train/mfu``: model FLOPs utilisation per device, from ``LanguageModel.flops_per_batch`` and
      the device's peak dense rate in the training precision: ``peak_flops`` (FLOP/s) where given,
      else Lightning's table of devices (none for CPUs or devices it does not list: no MFU then);
    - ``train/peak_memory_gib``: the most GPU memory allocated so far (CUDA only).

    Rates cover the last ``window_size`` - 1 logging intervals (``trainer.log_every_n_steps``
    steps each), timed on the GPU's timeline by CUDA events (on the host's clock on CPU), with
    validation left out. Lightning's monitor synchronises the GPU after every step to time it,
    which leaves the GPU idle while the host queues the next; here nothing waits. A logging step's
    rates join its row, which ``LanguageModel`` writes a few steps later (``add_to_step_row``),
    once the GPU has passed the step's event. The first ``warmup_steps`` optimizer steps of a fit
    (compilation, autotuning) are left out, and their time is logged once.
    """

    def __init__(self, window_size: int = 2, warmup_steps: int = 1, peak_flops: Optional[float] = None) -> None:
        if window_size < 2:
            raise ValueError(f"window_size must be at least 2 logging steps, got {window_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        number = isinstance(peak_flops, (int, float)) and not isinstance(peak_flops, bool)
        if peak_flops is not None and not (number and math.isfinite(peak_flops) and peak_flops > 0):
            raise ValueError(f"peak_flops must be a device's peak FLOP/s (a positive number, e.g. 989e12) or null, got {peak_flops!r}")
        self.peak_flops = peak_flops
        super().__init__(batch_size_fn=_windows_in_batch, length_fn=_tokens_in_batch, window_size=window_size)
        self.warmup_steps = warmup_steps
        self._steps = 0
        self._clock: Any = None
        self._counts = [0, 0, 0, 0]  # batches, windows, tokens since the clock started; FLOPs since the last mark
        self._fit_start = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.peak_flops is None:
            super().setup(trainer, pl_module, stage)
            return
        with warnings.catch_warnings():  # Lightning's "FLOPs not found" for a device it does not list
            warnings.filterwarnings("ignore", message=".*FLOPs not found.*")
            super().setup(trainer, pl_module, stage)
        self.available_flops = self.peak_flops
        for throughput in self._throughputs.values():
            throughput.available_flops = self.peak_flops

    def _start_clock(self, trainer: L.Trainer) -> None:
        on_cuda = trainer.strategy.root_device.type == "cuda"
        self._clock = _TrainingClock(torch.cuda.Event if on_cuda else _HostEvent)
        self._counts = [0, 0, 0, 0]
        throughput = self._throughputs[RunningStage.TRAINING]
        throughput.reset()
        throughput.update(time=0.0, batches=0, samples=0, lengths=0, flops=0)  # so the first window has an MFU

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps, self._clock = 0, None
        self._fit_start = time.perf_counter()
        if self.warmup_steps == 0:
            self._start_clock(trainer)

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counts = self._counts
        counts[0] += 1
        counts[1] += _windows_in_batch(batch)
        counts[2] += _tokens_in_batch(batch)
        counts[3] += int(getattr(pl_module, "flops_per_batch", None) or 0)
        if trainer.fit_loop._should_accumulate():
            return
        self._steps += 1
        if self._steps == self.warmup_steps:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)  # once: the warm-up's time, done
            seconds = time.perf_counter() - self._fit_start
            steps = "first step" if self.warmup_steps == 1 else f"first {self.warmup_steps} steps"
            rank_zero_info(
                f"{steps} took {seconds:.1f} s (warm-up, and compilation where compile is on; "
                "left out of train/tokens_per_s)"
            )
            self._start_clock(trainer)  # the windows begin after the warm-up
            return
        if self._clock is None or not trainer._logger_connector.should_update_logs:
            return
        mark, (batches, windows, tokens, flops) = self._clock.mark(), counts
        counts[3] = 0
        peak = None
        if trainer.strategy.root_device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30  # a host-side count

        def fill(clock: Any = self._clock, world_size: int = trainer.world_size) -> dict[str, float]:
            throughput = self._throughputs[RunningStage.TRAINING]
            throughput.update(
                time=clock.seconds(mark), batches=batches, samples=windows, lengths=tokens, flops=flops or None
            )
            metrics = throughput.compute()
            values = {}
            if "device/items_per_sec" in metrics:
                values["train/tokens_per_s"] = metrics["device/items_per_sec"] * world_size
            if "device/mfu" in metrics:
                values["train/mfu"] = metrics["device/mfu"]
            if peak is not None:
                values["train/peak_memory_gib"] = peak
            return values

        add_to_row = getattr(pl_module, "add_to_step_row", None)
        if add_to_row is None or not add_to_row(fill):
            for name, value in fill().items():
                # As host tensors: a Python number logged is copied to the GPU, a copy that waits for it.
                pl_module.log(name, torch.tensor(value), rank_zero_only=True)

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._clock is not None and not trainer.sanity_checking:
            self._clock.pause()

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass  # training's throughput only

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._clock is not None and not trainer.sanity_checking:
            self._clock.resume()


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing ``train/loss`` read at each refresh.

    Lightning turns every value logged with ``prog_bar=True`` into a Python number after every
    batch, a read that waits for the GPU. The training loss is logged without it, and the bar
    reads it here, once per refresh (``refresh_rate`` steps): with the fused optimizer, the host
    copy of the last row written (a few steps old, no wait); otherwise the device value, a wait.
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
