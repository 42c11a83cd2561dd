"""What ``train.py`` does with a composed config: validate, build, fit, report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from mgqa.data import build_tokenizer
from mgqa.lit.datamodule import TextDataModule
from mgqa.lit.module import LanguageModel
from mgqa.lit.report import final_report
from mgqa.model import ConfigError, ModelConfig

log = logging.getLogger("mgqa")


def resolve_model_config(cfg: DictConfig) -> ModelConfig:
    """The model config with ``num_tokens`` derived from the tokenizer when unset; validated."""
    values = OmegaConf.to_container(cfg.model, resolve=True)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if values.get("num_tokens") is None:
        values["num_tokens"] = tokenizer.vocab_size
    model_cfg = ModelConfig.from_dict(values)
    if model_cfg.num_tokens < tokenizer.vocab_size:
        raise ConfigError(
            f"model.num_tokens ({model_cfg.num_tokens}) is smaller than the {tokenizer.name!r} tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}); raise it or leave it null to derive it"
        )
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({model_cfg.max_seq_len})")
    return model_cfg


def resolve_precision(trainer_cfg: DictConfig) -> Any:
    """``precision: auto`` means bf16-mixed on a GPU, 32-true elsewhere."""
    if trainer_cfg.get("precision") != "auto":
        return trainer_cfg.precision
    accelerator = trainer_cfg.get("accelerator", "auto")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


def _instantiate_group(group: Optional[DictConfig]) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group, skipping null entries."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def build(cfg: DictConfig) -> tuple[LanguageModel, TextDataModule, L.Trainer]:
    """Validate the config, then build the LightningModule, DataModule and Trainer (no data read yet)."""
    model_cfg = resolve_model_config(cfg)
    datamodule: TextDataModule = instantiate(cfg.data)
    datamodule.check_files()
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    module = LanguageModel(model=model_cfg.to_dict(), optim=optim, tokenizer=datamodule.tokenizer.state())
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(cfg.trainer)
    trainer_cfg.pop("_target_", None)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not trainer_cfg.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_group(cfg.get("logger")) or False
    trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=loggers)
    return module, datamodule, trainer


def train(cfg: DictConfig) -> Optional[float]:
    """Fit, validate once more, print the final validation loss and a sample. Returns the final val loss."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist or is not a file")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule, trainer = build(cfg)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        params = module.model.num_parameters()
        log.info("run directory: %s", run_dir.resolve())
        log.info(
            "model: %.2fM parameters, %d heads / %d KV heads, KV cache %d bytes per token (bf16)",
            params / 1e6,
            module.model_config.heads,
            module.model_config.kv_heads,
            module.model.kv_cache_bytes_per_token(),
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    val_loss = float(results[0]["val/loss"]) if results else None
    if trainer.is_global_zero:
        final_report(module, datamodule.tokenizer, run_dir, val_loss, cfg.get("sample"))
    return val_loss
