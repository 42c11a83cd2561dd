"""Evaluate a trained checkpoint: `python evaluate.py ckpt_path=... [data=...] [split=val]`.

Prints loss, perplexity and bits per byte and writes them as JSON. Options: conf/evaluate.yaml;
the work is done by mgqa.lit.evaluate.
"""

from __future__ import annotations

from mgqa.lit.overrides import refuse_bad_overrides

if __name__ == "__main__":
    refuse_bad_overrides(__file__, "evaluate")  # one line for a mistyped key or option, before Hydra's report

# Imported after the check, which needs only Hydra: a mistyped option is refused at once, not
# after the seconds torch and Lightning take to load. Lightning still loads before Hydra sets up
# logging, which its console logger depends on.
# ruff: noqa: E402
import logging
import sys

import hydra
from omegaconf import DictConfig

from mgqa.lit.config import register_configs
from mgqa.lit.evaluate import evaluate
from mgqa.lit.validate import USER_ERRORS, user_message

register_configs()  # the ${mgqa.repo_root:} resolver of conf/paths/


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        evaluate(cfg)
    except (*USER_ERRORS, ValueError) as err:  # ValueError: a data option the data module refuses
        raise SystemExit(f"error: {user_message(err)}") from None


if __name__ == "__main__":
    main()
