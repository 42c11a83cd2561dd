"""The fused optimizer step's verdict: what the host reads of a step, a few steps after it ran."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch


@dataclasses.dataclass
class StepVerdict:
    """Whether an optimizer step was finite, held on the device until the host reads it."""

    step: int
    batch_idx: int
    epoch: int
    loss: torch.Tensor  # the step's loss; under gradient accumulation its first non-finite one
    loss_finite: torch.Tensor  # every loss of the step finite (bool)
    grad_norm: Optional[torch.Tensor] = None  # the total gradient norm
    # (update skipped, then the values of ``logged``), float32, on the host
    flags: Optional[torch.Tensor] = None
    ready: Optional[Any] = None  # an event recorded after the copy of ``flags``; None where it is synchronous
    # At a logging step: its row of metrics, written once the verdict is read. Host values, the
    # names of the device values copied with the flags, and callables adding values (the rates).
    row: Optional[dict[str, Any]] = None
    logged: tuple[str, ...] = ()
    values: Optional[list[float]] = None  # theirs, once read
    fills: list[Callable[[], dict[str, Any]]] = dataclasses.field(default_factory=list)


def to_host(flags: torch.Tensor) -> tuple[torch.Tensor, Optional[Any]]:
    """Queue a copy of ``flags`` to pinned host memory, and an event marking its end (None on CPU)."""
    if flags.device.type != "cuda":
        return flags, None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def clipping_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The ``grad_scale`` a fused optimizer divides every gradient by to clip their total ``norm``
    to ``max_norm``: ``clip_grad_norm_``'s factor max_norm / (norm + 1e-6) where the norm exceeds it."""
    return ((norm + 1e-6) / max_norm).clamp(min=1.0)
