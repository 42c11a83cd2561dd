"""One run per directory: a lock held for the life of a run, the run's record, and no trace of a refusal.

- ``RunDirLock`` takes an exclusive ``flock`` on ``<run_dir>/.lock`` and writes the holder (pid, host,
  start time) into it. A second launch on the same directory is refused with ``RunDirLocked`` naming
  the holder. The kernel drops a ``flock`` when its process dies, so a ``kill -9`` never leaves the
  directory locked; the holder's line left behind is reported as a stale lock and taken over.
- ``save_run_record`` writes ``.hydra/`` (composed config, Hydra config, overrides) once the run is
  accepted: ``conf/train.yaml`` turns off Hydra's own copy, which it writes before any validation and
  which a refused launch would overwrite.
- ``remove_if_empty`` takes back the directories Hydra created for a launch that was refused.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from mgqa.model.config import ConfigError

log = logging.getLogger("mgqa")

LOCK_NAME = ".lock"


class RunDirLocked(ConfigError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def describe_holder(text: str) -> str:
    """``pid 123 on host h since 2026-...`` from a lock file's ``pid host start`` line."""
    parts = text.split()
    if len(parts) < 2:
        return "an unknown process"
    since = f" since {parts[2]}" if len(parts) > 2 else ""
    return f"pid {parts[0]} on host {parts[1]}{since}"


class RunDirLock:
    """An exclusive lock on a run directory, for a ``with`` block (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # O_RDWR without O_TRUNC: a refused launch must not erase the holder's line.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise RunDirLocked(self._refusal(holder)) from None
        except OSError as err:  # a filesystem without flock (some network mounts): run, but say so
            os.close(fd)
            log.warning("cannot lock run directory %s (%s): a second launch on it would not be refused", self.run_dir, err)
            return
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            pid = previous.split()[0]
            state = "no longer running" if pid.isdigit() and not _pid_alive(int(pid)) else "its lock released"
            log.warning("run directory %s: stale lock of %s (%s) taken over", self.run_dir, describe_holder(previous), state)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {started}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def check_free(self) -> None:
        """Raise ``RunDirLocked`` if a live process holds the directory; writes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise RunDirLocked(self._refusal(holder)) from None
        except OSError:
            return  # no flock on this filesystem: acquire() says so
        finally:
            os.close(fd)

    def _refusal(self, holder: str) -> str:
        return (
            f"run directory {self.run_dir} is in use by {holder} ({self.path}); wait for that run to end, "
            "stop it, or choose another run_name"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty lock file: a clean end, not a stale lock
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()


def save_run_record(run_dir: Path, cfg: DictConfig) -> None:
    """``<run_dir>/.hydra/{config,hydra,overrides}.yaml`` for the accepted run (inside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = run_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")


def remove_if_empty(directory: str | os.PathLike, stop_at: str | os.PathLike) -> None:
    """Remove ``directory`` and its parents below ``stop_at`` while they are empty."""
    path, stop = Path(directory).resolve(), Path(stop_at).resolve()
    while path != stop and stop in path.parents:
        try:
            path.rmdir()  # fails on a directory that holds anything
        except OSError:
            return
        path = path.parent


def check_resumable_name(cfg: DictConfig) -> None:
    """``ckpt_path=last`` with the default timestamped ``run_name`` would start a new directory on every
    launch and never resume: refuse, naming the newest run under ``output_root`` to resume."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    if str(cfg.get("ckpt_path")) != "last" or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return  # every job of a sweep has its own directory
    keys = {o.split("=", 1)[0].lstrip("+~") for o in hydra_cfg.overrides.task}
    raw_name = str(OmegaConf.to_container(cfg, resolve=False).get("run_name", ""))
    if not raw_name.startswith("${now:") or keys & {"hydra.run.dir", "run_dir"}:
        return  # a name (from the command line or an experiment) or an explicit directory: resumable
    root = Path(str(cfg.output_root))
    own = Path(hydra_cfg.runtime.output_dir).resolve()
    runs = [p for p in root.glob("*/checkpoints") if p.parent.resolve() != own] if root.is_dir() else []
    hint = ""
    if runs:
        newest = max(runs, key=lambda p: p.stat().st_mtime).parent
        hint = f"; the newest run under {root} is {newest.name}: python train.py run_name={newest.name} ckpt_path=last"
    raise ConfigError(
        "ckpt_path=last needs run_name=NAME: without it every launch gets a new timestamped directory "
        f"and there is nothing to resume{hint}"
    )
