"""Sample from a trained checkpoint: `python generate.py ckpt_path=... prompt="..."` or `run_name=X`.

Options: conf/generate.yaml; the work is done by mgqa.lit.generate.
"""

from __future__ import annotations

from mgqa.lit.overrides import refuse_bad_overrides

if __name__ == "__main__":
    refuse_bad_overrides(__file__, "generate")  # one line for a mistyped key or option, before Hydra's report

# Imported after the check, which needs only Hydra: a mistyped option is refused at once, not
# after the seconds torch and Lightning take to load. Lightning still loads before Hydra sets up
# logging, which its console logger depends on.
# ruff: noqa: E402
import logging
import sys

import hydra
from omegaconf import DictConfig

from mgqa.lit.config import register_configs
from mgqa.lit.generate import generate
from mgqa.lit.validate import USER_ERRORS, user_message

register_configs()  # the ${mgqa.repo_root:} resolver of conf/paths/


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        generate(cfg)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {user_message(err)}") from None


if __name__ == "__main__":
    main()
