"""Train a GQA decoder: `python train.py [group=option ...] [key=value ...]`.

Configs live in conf/ (see conf/train.yaml); the work is done by mgqa.lit.run.train.
"""

from __future__ import annotations

from mgqa.lit.overrides import refuse_bad_overrides

if __name__ == "__main__":
    refuse_bad_overrides(__file__, "train")  # one line for a mistyped key or option, before Hydra's report

# Imported after the check, which needs only Hydra: a mistyped option is refused at once, not
# after the seconds torch and Lightning take to load. Lightning still loads before Hydra sets up
# logging, which its console logger depends on.
# ruff: noqa: E402
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mgqa.lit.config import register_configs
from mgqa.lit.console import quiet_console
from mgqa.lit.launch import job_scope
from mgqa.lit.run import train
from mgqa.lit.rundir import remove_if_empty
from mgqa.lit.sweep import objective
from mgqa.lit.validate import USER_ERRORS, user_message

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_console()
    try:
        with job_scope():  # each job of a `-m` sweep starts clean: no process group, env or wandb run left over
            return objective(cfg, train(cfg))
    except USER_ERRORS as err:  # the message is the whole story
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the job as failed and runs the next one
        # A refused launch leaves no directory behind (Hydra made it before the checks).
        remove_if_empty(HydraConfig.get().runtime.output_dir, stop_at=Path(str(cfg.output_root)).parent)
        raise SystemExit(f"error: {user_message(err)}") from None


if __name__ == "__main__":
    main()
