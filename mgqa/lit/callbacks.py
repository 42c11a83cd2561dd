"""Callbacks: throughput, checkpoint-on-signal, random-state checkpointing."""

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
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: tokens of the optimizer steps since the last log, over wall time.

    Counts this process's tokens times the world size (every rank trains on the same batch shape).
    """

    def __init__(self) -> None:
        self._last_time: float | None = None
        self._tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._last_time is None:
            self._last_time = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += batch[0].numel() * trainer.world_size
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and self._last_time is not None:
            now = time.perf_counter()
            elapsed = now - self._last_time
            if elapsed > 0:
                pl_module.log("train/tokens_per_s", self._tokens / elapsed)
            self._last_time, self._tokens = now, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation time is not training throughput: restart the window.
        self._last_time, self._tokens = None, 0


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
        # Stopping runs the epoch-end hooks; a checkpoint written there would look like an
        # end-of-epoch state and resume at the next epoch. Mark this step as saved.
        for callback in trainer.checkpoint_callbacks:
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
