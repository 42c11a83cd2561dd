"""Export a trained checkpoint as a Hugging Face Llama directory: `python export.py ckpt_path=... out_dir=...`.

`transformers.LlamaForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` load
it without custom code. Options: conf/export.yaml; the weight map is mgqa.convert.hf_export.
"""

from __future__ import annotations

from mgqa.lit.overrides import refuse_bad_overrides

if __name__ == "__main__":
    refuse_bad_overrides(__file__, "export")  # one line for a mistyped key or option, before Hydra's report

# Imported after the check, which needs only Hydra: a mistyped option is refused at once, not
# after the seconds torch and Lightning take to load. Lightning still loads before Hydra sets up
# logging, which its console logger depends on.
# ruff: noqa: E402
import logging
import sys

import hydra
from omegaconf import DictConfig

from mgqa.convert.hf_export import check_exportable, export_hf
from mgqa.lit.config import register_configs
from mgqa.lit.trained import load_trained
from mgqa.lit.validate import USER_ERRORS, user_message
from mgqa.model import ConfigError

register_configs()  # the ${mgqa.repo_root:} resolver of conf/paths/


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if not cfg.get("out_dir"):
            raise ConfigError("out_dir is required: the directory to write the Hugging Face model to")
        trained = load_trained(cfg.get("ckpt_path"), cfg.get("run_name"), cfg.output_root, device="cpu")
        check_exportable(trained.model.config)
        out = export_hf(trained.model, trained.tokenizer, cfg.out_dir, dtype=cfg.dtype)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {user_message(err)}") from None
    print(f"exported {trained.path} (step {trained.step}) to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
