"""``init.from``: start a run from another model's weights only (a fresh optimizer, schedule and step count).

The source is an mgqa checkpoint (or a run directory: its best checkpoint) or a local Hugging Face
Llama-family directory. The run takes the source's architecture; ``init.kv_heads`` re-groups its K/V
heads by ``init.method`` (``mgqa.convert.kv_heads``: the GQA paper's MHA -> GQA conversion), and
``init.alpha`` sets ``trainer.max_steps`` to that fraction of the source run's steps (uptraining).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, open_dict

from mgqa.convert.hf_import import read_hf
from mgqa.convert.kv_heads import convert_kv_heads
from mgqa.data.tokenizer import build_tokenizer
from mgqa.lit.checkpoint import load_checkpoint, same_tokenizer
from mgqa.lit.trained import model_state, resolve_checkpoint, tokenizer_from_checkpoint
from mgqa.model import ConfigError, MGQATransformer, ModelConfig

log = logging.getLogger("mgqa")

# Options of the run's own model config that the source does not decide: they change training, not weights.
# With rotary positions the context length is one too (no weight depends on it).
RUN_OPTIONS = ("dropout", "attn_backend")
ROTARY_RUN_OPTIONS = ("max_seq_len",)


@dataclass
class InitSource:
    """Converted weights for the run's model, and what they came from."""

    state: dict[str, torch.Tensor]
    config: ModelConfig
    description: str

    def load_into(self, model: MGQATransformer) -> None:
        """Copy the weights into ``model`` (built from the config ``apply_init`` wrote)."""
        model.load_state_dict(self.state, strict=True)
        log.info("initialised from %s", self.description)


def _read_source(source: str, output_root: str) -> tuple[dict[str, torch.Tensor], ModelConfig, Optional[dict], Optional[int], dict]:
    """(state, config, tokenizer state or None, source steps or None, source hyperparameters)."""
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        state, config = read_hf(path)
        tokenizer = None
        try:
            tokenizer = build_tokenizer(str(path)).state()
        except (ValueError, FileNotFoundError) as err:
            log.warning("init.from=%s: its tokenizer does not load (%s); only the vocabulary size is checked", source, err)
        return state, config, tokenizer, None, {}
    ckpt = resolve_checkpoint(source, None, output_root)
    checkpoint = load_checkpoint(ckpt)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not hparams.get("model"):
        raise ConfigError(f"init.from={source}: {ckpt} carries no model hyperparameters; it was not written by mgqa")
    config = ModelConfig.from_dict(dict(hparams["model"]))
    tokenizer = tokenizer_from_checkpoint(checkpoint, ckpt).state()
    return model_state(checkpoint), config, tokenizer, int(checkpoint.get("global_step", 0)), hparams


def apply_init(cfg: DictConfig) -> Optional[InitSource]:
    """Read ``cfg.init``; write the source's architecture into ``cfg.model`` (and, with ``init.alpha``,
    the uptraining length into ``cfg.trainer.max_steps``) and return the converted weights.
    None without ``init.from``. Raises ConfigError naming a bad value before any data is read."""
    init = cfg.get("init")
    if not init or not init.get("from"):
        if init and init.get("alpha") is not None:
            raise ConfigError("init.alpha is set but init.from is not: give the checkpoint or HF directory to uptrain")
        return None
    source = str(init["from"])
    state, config, tokenizer, steps, hparams = _read_source(source, str(cfg.get("output_root", "outputs")))
    kv_heads = init.get("kv_heads") or config.kv_heads
    generator = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    state, config = convert_kv_heads(state, config, int(kv_heads), str(init.get("method", "mean")), generator)
    keep = RUN_OPTIONS + (ROTARY_RUN_OPTIONS if config.pos_emb == "rotary" else ())
    with open_dict(cfg):
        for key, value in config.to_dict().items():
            if key not in keep:
                cfg.model[key] = value
    config = ModelConfig.from_dict({**config.to_dict(), **{k: cfg.model[k] for k in keep}})
    _check_tokenizer(cfg, source, tokenizer, config)
    if init.get("alpha") is not None:
        _set_uptrain_steps(cfg, init, steps, hparams)
    what = f"{source} ({config.heads} heads, {config.kv_heads} KV heads by {init.get('method', 'mean')})"
    return InitSource(state=state, config=config, description=what)


def _check_tokenizer(cfg: DictConfig, source: str, stored: Optional[dict], config: ModelConfig) -> None:
    run = build_tokenizer(cfg.data.tokenizer, cfg.data.get("eot_token")).state()
    if stored is not None and not same_tokenizer(stored, run):
        hint = f"data.tokenizer={source}" if Path(source).is_dir() and (Path(source) / "config.json").is_file() else f"data.tokenizer={stored.get('name')}"
        raise ConfigError(
            f"init.from={source} was trained with tokenizer {stored.get('name')!r}, this run uses "
            f"{cfg.data.tokenizer!r}; set {hint}"
        )
    if run["vocab_size"] > config.num_tokens:
        raise ConfigError(f"data.tokenizer has {run['vocab_size']} tokens, init.from={source} only {config.num_tokens}")


def _set_uptrain_steps(cfg: DictConfig, init: Any, steps: Optional[int], hparams: dict) -> None:
    """max_steps = alpha * the source's steps; the warm-up shrinks by the same factor (same schedule shape)."""
    alpha = float(init["alpha"])
    source_steps = init.get("source_steps") or steps
    if not source_steps:
        raise ConfigError(f"init.alpha={alpha} needs the source run's step count: set init.source_steps (init.from={init['from']})")
    if not alpha > 0:
        raise ConfigError(f"init.alpha must be > 0, got {alpha}; to use the converted model untrained, give alpha=null and trainer.max_steps")
    max_steps = max(1, round(alpha * int(source_steps)))
    with open_dict(cfg):
        cfg.trainer.max_steps = max_steps
        scheduler = cfg.optim.get("scheduler")
        if scheduler is not None and "warmup_steps" in scheduler:
            source_warmup = ((hparams.get("optim") or {}).get("scheduler") or {}).get("warmup_steps", scheduler.warmup_steps)
            scheduler.warmup_steps = round(alpha * int(source_warmup))
    log.info("uptraining for %d steps (alpha %.3g of %d source steps)", max_steps, alpha, int(source_steps))
