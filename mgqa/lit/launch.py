"""Starting the ranks of one training job, also from inside a Hydra multirun sweep.

Lightning's subprocess launcher starts ranks 1..N-1 by re-running ``sys.argv``. Under ``python train.py -m
...`` that argv is the whole sweep, so every extra rank would run the sweep again, in other directories.
The strategies here keep Lightning's launcher but start each extra rank as a single Hydra *run* of the
current job: the job's own overrides (``hydra.overrides.task``, never ``-m``) with ``hydra.run.dir`` set to
the job's directory. ``job_scope`` then cleans up what a job leaves behind (process group, the
``MASTER_PORT``/``LOCAL_RANK``... variables the launcher exports, child ranks, the wandb run) so the next
job of the sweep starts from a clean process.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import ListConfig

log = logging.getLogger("mgqa")

# Variables Lightning's launcher exports in the launching process (and seeding adds); they must not leak
# into the next job of a sweep, where a stale LOCAL_RANK would make Lightning wait for ranks nobody starts.
LAUNCH_ENV_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)

# Child ranks started by this process for the current job; job_scope waits for them.
_live_children: list[subprocess.Popen] = []


def job_rank_command(local_rank: int) -> tuple[list[str], Optional[str]]:
    """The command line and working directory that start ``local_rank`` of the current job.

    Inside a Hydra app this is ``train.py`` with the job's overrides as a single run in the job's
    directory, in run mode as in multirun mode; outside Hydra it is Lightning's plain re-run of argv.
    """
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if not HydraConfig.initialized():
        return list(_basic_subprocess_cmd()), None
    import __main__  # noqa: PLC0415

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    primary = [s.path for s in hydra_cfg.runtime.config_sources if s.provider == "main" and s.schema == "file"]
    if primary:
        command.append(f"--config-path={primary[0]}")
    command.append(f"--config-name={hydra_cfg.job.config_name}")
    command += list(hydra_cfg.overrides.task)
    command += [
        f"hydra.run.dir={_quote(hydra_cfg.runtime.output_dir)}",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
        # Rank 0 already saved the job's .hydra/ files; the others must not rewrite them.
        "hydra.output_subdir=null",
    ]
    return command, hydra_cfg.runtime.cwd


def _quote(value: str) -> str:
    """Quote a value for Hydra's override grammar (paths may hold '=' or ',' from override_dirname)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class JobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher with ranks started by ``job_rank_command``.

    A rank that dies takes the other child ranks down with it, as in Lightning, but not the launching
    process: inside a sweep that process is also running the remaining jobs, and it sees the failure as
    an error from the collective it was waiting in.
    """

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _ChildWatcher(self.procs).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        if self.procs:
            # Trainer.validate after Trainer.fit reuses the ranks already running.
            return
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            child_env = os.environ.copy()
            child_env["LOCAL_RANK"] = str(local_rank)
            command, cwd = job_rank_command(local_rank)
            proc = subprocess.Popen(command, env=child_env, cwd=cwd)
            self.procs.append(proc)
            _live_children.append(proc)


class _ChildWatcher(threading.Thread):
    """Kills the remaining child ranks once one of them fails (a rank stuck in a collective never exits)."""

    def __init__(self, procs: Sequence[subprocess.Popen], period_s: float = 2.0) -> None:
        super().__init__(daemon=True, name="mgqa-rank-watcher")
        self.procs, self.period_s = procs, period_s

    def run(self) -> None:
        while True:
            time.sleep(self.period_s)
            codes = [p.poll() for p in self.procs]
            if all(c == 0 for c in codes):
                return
            failed = [(i + 1, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                log.error("rank(s) %s exited with code(s) %s; stopping the job's other ranks",
                          [r for r, _ in failed], [c for _, c in failed])
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
                return


class JobDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose extra ranks run the current Hydra job (see the module docstring)."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = JobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


class JobFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` whose extra ranks run the current Hydra job (see the module docstring).

    ``auto_wrap_policy`` and ``activation_checkpointing_policy`` also take lists of class paths
    (``[mgqa.model.decoder.Block]``), as a YAML config can give them.
    """

    def __init__(self, *args: Any, auto_wrap_policy: Any = None, activation_checkpointing_policy: Any = None, **kwargs: Any) -> None:
        super().__init__(
            *args,
            auto_wrap_policy=_module_classes(auto_wrap_policy),
            activation_checkpointing_policy=_module_classes(activation_checkpointing_policy),
            **kwargs,
        )

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = JobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


def _module_classes(policy: Any) -> Any:
    """A list of class paths -> the set of classes Lightning's FSDP policies take; anything else as is."""
    if isinstance(policy, ListConfig):  # as Hydra's instantiate passes a YAML list
        policy = list(policy)
    if isinstance(policy, (list, tuple)) and all(isinstance(p, str) for p in policy):
        from hydra.utils import get_class  # noqa: PLC0415

        return {get_class(path) for path in policy}
    return policy


@contextmanager
def job_scope(child_timeout_s: float = 120.0) -> Iterator[None]:
    """Run one training job and leave the process as it was: wait for (or stop) the job's child ranks,
    destroy the process group, finish the wandb run, and restore the launch variables
    (``LAUNCH_ENV_VARS``) to their values before the job, so variables set by torchrun or SLURM stay."""
    saved = {name: os.environ.get(name) for name in LAUNCH_ENV_VARS}
    try:
        yield
    finally:
        # Destroy before waiting: with NCCL, a child rank's destroy can wait for this rank's.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        _reap_children(child_timeout_s)
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _reap_children(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _live_children:
        proc = _live_children.pop()
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("rank process %d did not exit after the job; killing it", proc.pid)
            proc.kill()
            proc.wait()
