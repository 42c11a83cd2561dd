"""Checkpoint files that survive faults: atomic writes, safe loads, and picking what to resume.

- ``AtomicCheckpointIO`` writes to a temporary file in the same directory, fsyncs it, renames it
  over the target and fsyncs the directory: a ``kill -9`` at any moment leaves either the old file
  or the new one, never a torn one. It loads with ``torch.load(weights_only=True)``, so a checkpoint
  cannot run code.
  It refuses to write a state holding a NaN or infinity (``NonFiniteStateError``): no checkpoint on
  disk is ever poisoned, so resuming always starts from finite weights and optimizer state.
- ``find_resume_checkpoint`` implements ``ckpt_path=last``: the newest checkpoint of a run that loads
  and is finite; every damaged file (empty, truncated, garbage, a directory) is skipped with a warning.
- ``check_compatible`` compares a checkpoint's stored hyperparameters with the current run's.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mgqa.atomic import atomic_write
from mgqa.model.config import ConfigError

log = logging.getLogger("mgqa")

CHECKPOINT_SUFFIX = ".ckpt"
# Model options that change how a run computes, not what the weights mean: free to differ on resume.
RUN_TIME_OPTIONS = ("attn_backend", "activation_checkpointing")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file."""


class NonFiniteStateError(CheckpointError):
    """A training state (weights or optimizer moments) holding NaN or infinity, refused on save or load."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type name when the message is empty."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def nonfinite_tensors(checkpoint: dict[str, Any], limit: int = 3) -> list[str]:
    """Names of up to ``limit`` floating-point tensors of the weights (``state_dict``) and optimizer
    states that hold NaN or infinity; empty when the state is finite. One host sync per device for a
    finite state (the common case), not one per tensor."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel():
                tensors.append((name, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}" if name else str(key), item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{name}[{index}]", item)

    visit("", checkpoint.get("state_dict", {}))
    visit("optimizer_states", checkpoint.get("optimizer_states", []))
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for _, value in tensors:
        flags.setdefault(value.device, []).append(torch.isfinite(value).all())
    if all(bool(torch.stack(device_flags).all()) for device_flags in flags.values()):
        return []
    return [name for name, value in tensors if not bool(torch.isfinite(value).all())][:limit]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path``, atomically (``mgqa.atomic.atomic_write``)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it (``weights_only=True``).

    Raises ``FileNotFoundError`` or ``CheckpointError`` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it holds objects that are not plain data and loading "
            f"them could run code ({first_line(err)})"
        ) from err
    except Exception as err:  # torch.load fails in many ways on torn or foreign bytes
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line(err)})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not an mgqa/Lightning checkpoint (no 'state_dict')")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with durable atomic saves and code-free loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        bad = nonfinite_tensors(checkpoint)
        if bad:
            raise NonFiniteStateError(
                f"refusing to write checkpoint {path}: the state at step {checkpoint.get('global_step')} holds "
                f"NaN or infinity ({', '.join(bad)}); the checkpoints on disk stay finite: resume with "
                "ckpt_path=last and a lower optim.optimizer.lr"
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location)


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run in the order ``ckpt_path=last`` tries them: newest first (by
    modification time), the ``best-*`` files last. Those are written at the end of validation, a
    state Lightning resumes less exactly than the end of a training batch, where the others are."""
    # Directories named *.ckpt stay in, so that ckpt_path=last names them when it skips them.
    found = [p for p in run_dir.glob(f"checkpoints/*{CHECKPOINT_SUFFIX}") if p.exists()]
    found += [p for p in run_dir.glob(f"hpc_ckpt_*{CHECKPOINT_SUFFIX}") if p.exists()]  # SLURM requeue saves
    return sorted(found, key=lambda p: (p.name.startswith("best"), -p.stat().st_mtime_ns))


def load_finite_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``load_checkpoint``, refusing a state with NaN or infinity (``NonFiniteStateError``)."""
    checkpoint = load_checkpoint(path, map_location)
    bad = nonfinite_tensors(checkpoint)
    if bad:
        raise NonFiniteStateError(f"checkpoint {path} holds NaN or infinity ({', '.join(bad)}); resume an earlier one")
    return checkpoint


def find_resume_checkpoint(run_dir: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint of ``run_dir`` that loads and is finite, with its contents; None if there is none.

    Every other file (empty, truncated, garbage, not a checkpoint, non-finite) is skipped with a warning
    naming it.
    """
    for path in checkpoint_candidates(run_dir):
        try:
            return path, load_finite_checkpoint(path)
        except (CheckpointError, OSError) as err:
            log.warning("skipping %s", err)
    return None


def check_compatible(path: Path, checkpoint: dict[str, Any], model: dict[str, Any], tokenizer: Optional[dict[str, Any]]) -> None:
    """Raise ``CheckpointError`` listing every model or tokenizer field that differs."""
    stored = checkpoint.get("hyper_parameters") or {}
    stored_model = stored.get("model") or {}
    if not stored_model:
        raise CheckpointError(f"checkpoint {path} carries no model hyperparameters; it was not written by mgqa")
    diffs = [
        f"model.{key}: checkpoint {stored_model.get(key)!r}, this run {model.get(key)!r}"
        for key in sorted(set(stored_model) | set(model))
        if key not in RUN_TIME_OPTIONS and stored_model.get(key) != model.get(key)
    ]
    stored_tok = stored.get("tokenizer")
    if tokenizer is not None and stored_tok is not None and not same_tokenizer(stored_tok, tokenizer):
        diffs.append(f"tokenizer: checkpoint {stored_tok!r}, this run {tokenizer!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match this run's config:\n  " + "\n  ".join(diffs))


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two tokenizer states name the same tokenizer: by content hash when both carry one (the path it
    was loaded from may differ), else field by field."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"] and a.get("eot_token") == b.get("eot_token")
    strip = lambda state: {k: v for k, v in state.items() if k != "sha256"}  # noqa: E731 (older states carry none)
    return strip(a) == strip(b)
