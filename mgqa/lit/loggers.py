"""Weights & Biases logging that never blocks a run: online with an account, offline without one.

``wandb_logger`` (the ``_target_`` of conf/logger/wandb.yaml) builds Lightning's ``WandbLogger`` with:

- the mode: ``WANDB_MODE`` if set, else ``online`` when an API key is configured (``WANDB_API_KEY`` or a
  ``wandb login`` entry in ~/.netrc), else ``offline`` (the run is written under ``<run_dir>/wandb/`` and
  can be uploaded later with ``wandb sync``); online start-up gives up after ``init_timeout_s``;
- the run id stored in ``<run_dir>/wandb_id.txt``, so a resumed run (same run directory, or a checkpoint
  from another run directory) continues the same wandb run;
- the run name (the run directory's name) and, inside a ``-m`` sweep, a group shared by the sweep's jobs;
- the run's ``tags`` and its ``task_name`` as the wandb job type.

Only global rank 0 creates a wandb run (Lightning's ``rank_zero_experiment``); ``mgqa.lit.launch.job_scope``
finishes it after each job of a sweep.
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import urlparse

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

ID_FILE = "wandb_id.txt"


def has_wandb_credentials() -> bool:
    """Whether wandb could log in without asking: an API key in the environment or in the netrc file."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: Optional[str]) -> str:
    """``mode`` if given, else ``WANDB_MODE``, else online with credentials and offline without."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if has_wandb_credentials() else "offline"


def run_id(run_dir: Path, ckpt_path: Optional[str]) -> str:
    """The wandb run id of this run directory: the stored one, else the one of the run the checkpoint
    came from, else a new one. Rank 0 stores it in ``<run_dir>/wandb_id.txt``."""
    candidates = [run_dir / ID_FILE]
    if ckpt_path and ckpt_path != "last":
        candidates.append(Path(ckpt_path).resolve().parent.parent / ID_FILE)
    for path in candidates:
        if path.is_file() and path.read_text().strip():
            found = path.read_text().strip()
            break
    else:
        found = secrets.token_hex(4)  # wandb ids: up to 64 of [a-z0-9_-]
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ID_FILE).write_text(found + "\n")
    return found


def sweep_group() -> Optional[str]:
    """Inside a Hydra multirun: the sweep directory's name, shared by all its jobs; else None."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(hydra_cfg.sweep.dir).name}"


def wandb_logger(
    run_dir: str,
    project: str = "mgqa",
    entity: Optional[str] = None,
    name: Optional[str] = None,
    group: Optional[str] = None,
    tags: Optional[list[str]] = None,
    mode: Optional[str] = None,
    ckpt_path: Optional[str] = None,
    init_timeout_s: float = 60.0,
    log_model: bool = False,
    job_type: Optional[str] = None,
) -> WandbLogger:
    """Lightning's ``WandbLogger`` for the run in ``run_dir`` (see the module docstring)."""
    import wandb  # noqa: PLC0415

    path = Path(run_dir)
    mode = resolve_mode(mode)
    return WandbLogger(
        save_dir=str(path),
        project=project,
        entity=entity,
        name=name or path.name,
        group=group or sweep_group(),
        tags=list(tags) if tags else None,
        id=run_id(path, ckpt_path),
        offline=mode == "offline",
        mode=mode,
        log_model=log_model and mode == "online",
        settings=wandb.Settings(init_timeout=init_timeout_s, console="off"),
        job_type=job_type,
    )


def log_config(loggers: Iterable[Logger], cfg: DictConfig) -> None:
    """Give every logger the run's ``task_name`` and ``tags`` (CSV and TensorBoard: their hparams.yaml) and
    send the resolved Hydra config to the wandb run(s) (other loggers keep it in config.yaml)."""
    labels = {"task_name": cfg.get("task_name"), "tags": list(cfg.get("tags") or [])}
    for logger in loggers:
        logger.log_hyperparams(labels)
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(
                {"config": OmegaConf.to_container(cfg, resolve=True)}, allow_val_change=True
            )
