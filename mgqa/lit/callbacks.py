"""Callbacks: training throughput in tokens per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


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
