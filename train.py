"""Train a GQA decoder: `python train.py [group=option ...] [key=value ...]`.

Configs live in conf/ (see conf/train.yaml); the work is done by mgqa.lit.run.train.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mgqa.lit.config import register_configs
from mgqa.lit.run import train
from mgqa.lit.module import NonFiniteLossError
from mgqa.model import ConfigError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except (ConfigError, FileNotFoundError, NonFiniteLossError) as err:
        # A wrong setting or path: the message is the whole story, no traceback.
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
