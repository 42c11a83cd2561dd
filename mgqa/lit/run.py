"""What ``train.py`` does with a composed config: validate, build, fit, report."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mgqa.data import DataError, build_tokenizer
from mgqa.lit.callbacks import ConfiguredLearningRate, FinalValidation, SignalCheckpoint
from mgqa.lit.checkpoint import (
    AtomicCheckpointIO,
    check_compatible,
    checkpoint_candidates,
    find_resume_checkpoint,
    first_line,
    load_checkpoint,
    load_finite_checkpoint,
)
from mgqa.lit.csv_logger import truncate_metrics
from mgqa.lit.datamodule import TextDataModule
from mgqa.lit.init import apply_init
from mgqa.lit.loggers import log_config
from mgqa.lit.module import LanguageModel
from mgqa.lit.report import final_report
from mgqa.lit.rundir import RunDirLock, check_resumable_name, save_run_record
from mgqa.lit.trained import TokenizerInCheckpoint
from mgqa.lit.validate import validate_config
from mgqa.model import ConfigError, MGQATransformer, ModelConfig

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


def _check_fsdp_device(trainer_cfg: DictConfig) -> None:
    """PyTorch's FSDP runs on GPUs only; say so before any process starts."""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" not in target.lower():
        return
    accelerator = trainer_cfg.get("accelerator", "auto")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise ConfigError(
            f"trainer=fsdp needs CUDA GPUs (trainer.accelerator={accelerator}, "
            f"CUDA available: {torch.cuda.is_available()}); on CPU use trainer=ddp trainer.accelerator=cpu"
        )


def _instantiate_group(group: Optional[DictConfig], name: str) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group, skipping null entries. A value the
    target refuses is a ``ConfigError`` naming the entry (``callbacks.latest_checkpoint: ...``)."""
    if not group:
        return []
    objects = []
    for key, node in group.items():
        if node is None or "_target_" not in node:
            continue
        try:
            objects.append(instantiate(node))
        except InstantiationException as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            raise ConfigError(f"{name}.{key}: {first_line(cause)}") from err
    return objects


def build(
    cfg: DictConfig, model_cfg: Optional[ModelConfig] = None
) -> tuple[LanguageModel, TextDataModule, L.Trainer]:
    """Validate the config, then build the LightningModule, DataModule and Trainer (no data read yet).
    ``model_cfg``: the config's model, already resolved (``resolve_model_config``)."""
    model_cfg = model_cfg or resolve_model_config(cfg)
    try:
        datamodule: TextDataModule = instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, TypeError):  # an unknown key added with +data.<key>=...
            raise ConfigError(f"data: {cause}") from err
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise ConfigError(str(cause)) from err
        raise
    datamodule.check_files()
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    nonfinite = OmegaConf.to_container(cfg.nonfinite_loss, resolve=True) if cfg.get("nonfinite_loss") else None
    module = LanguageModel(
        model=model_cfg.to_dict(),
        optim=optim,
        tokenizer=datamodule.tokenizer.state(),
        nonfinite_loss=nonfinite,
        compile=cfg.get("compile", False),
        compile_mode=cfg.get("compile_mode", "default"),
    )
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(cfg.trainer)
    trainer_cfg.pop("_target_", None)
    _check_fsdp_device(cfg.trainer)
    for key in ("strategy", "profiler"):  # objects, e.g. conf/trainer/ddp.yaml, conf/debug/profile.yaml
        if isinstance(trainer_cfg.get(key), dict):
            trainer_cfg[key] = instantiate(cfg.trainer[key])
    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks")
    if not trainer_cfg.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks += [ConfiguredLearningRate(), FinalValidation(), TokenizerInCheckpoint()]
    loggers = _instantiate_group(cfg.get("logger"), "logger") or False
    plugins = list(trainer_cfg.pop("plugins", None) or [])
    if "fsdp" not in str(trainer_cfg.get("strategy", "")).lower():  # FSDP writes sharded checkpoints itself
        plugins.append(AtomicCheckpointIO())
    trainer_cfg.setdefault("default_root_dir", str(cfg.run_dir))
    try:
        trainer = L.Trainer(**trainer_cfg, callbacks=callbacks, logger=loggers, plugins=plugins)
    except (TypeError, ValueError, MisconfigurationException) as err:  # an unknown or refused trainer.* value
        raise ConfigError(f"trainer: {first_line(err)}") from err
    return module, datamodule, trainer


def resolve_resume(
    cfg: DictConfig, run_dir: Path, model_cfg: ModelConfig, tokenizer: dict[str, Any]
) -> tuple[Optional[Path], int]:
    """The checkpoint to resume from (None: a fresh start) and its optimizer step.

    ``ckpt_path=last`` picks the newest loadable checkpoint of the run directory and starts fresh,
    with a notice, when there is none. A fresh start never overwrites an earlier run's checkpoints.
    The checkpoint must match the run's model and ``tokenizer`` (the data module's, so its
    end-of-text token is the one this run uses).
    """
    requested = cfg.get("ckpt_path")
    if requested is None:
        existing = checkpoint_candidates(run_dir)
        if existing:
            raise ConfigError(
                f"run directory {run_dir} already holds checkpoints ({', '.join(p.name for p in existing[:3])}); "
                "resume it with ckpt_path=last, or choose another run_name"
            )
        return None, 0
    if str(requested) == "last":
        found = find_resume_checkpoint(run_dir)
        if found is None:
            rank_zero_info(f"ckpt_path=last: no checkpoint in {run_dir}, starting a new run")
            return None, 0
        path, checkpoint = found
    else:
        path = Path(requested)
        checkpoint = load_finite_checkpoint(path)
    check_compatible(path, checkpoint, model_cfg.to_dict(), tokenizer)
    step = int(checkpoint.get("global_step", 0))
    rank_zero_info(f"resuming from {path} (step {step})")
    return path, step


def _launching_rank_zero() -> bool:
    """Global rank 0, read from the launcher's environment (the trainer does not exist yet)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    node_rank = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return node_rank == 0 and rank_zero_only.rank == 0


def train(cfg: DictConfig) -> Optional[float]:
    """Fit, validate once more, print the final validation loss and a sample. Returns the final val loss.

    Everything is checked before the run directory is written: the config, the run-directory lock,
    the data files, the checkpoint to resume. Rank 0 then holds the directory's lock (``RunDirLock``)
    until the run ends. Stopped by a signal, it saves ``last.ckpt`` and returns None without the final
    report.
    """
    run_dir = Path(cfg.run_dir)
    check_resumable_name(cfg)
    init = apply_init(cfg)  # init.from: the source's architecture into cfg.model, its weights loaded below
    validate_config(cfg)
    model_cfg = resolve_model_config(cfg)
    owner = _launching_rank_zero()
    if owner:
        RunDirLock(run_dir).check_free()
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    L.seed_everything(cfg.seed, workers=True)
    module, datamodule, trainer = build(cfg, model_cfg)
    ckpt_path, start_step = resolve_resume(cfg, run_dir, model_cfg, datamodule.tokenizer.state())
    if init is not None and ckpt_path is None:
        init.load_into(module.model)
    new_dir = owner and ckpt_path is None and not run_dir.exists()
    try:
        with RunDirLock(run_dir) if owner else contextlib.nullcontext():
            return _fit(cfg, run_dir, module, datamodule, trainer, ckpt_path, start_step)
    except DataError:
        # Some data faults show only while the data is set up (a corpus shorter than one batch per
        # reader needs the counting pass): a fresh run refused that way leaves no directory behind.
        if new_dir and not checkpoint_candidates(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _fit(
    cfg: DictConfig,
    run_dir: Path,
    module: LanguageModel,
    datamodule: TextDataModule,
    trainer: L.Trainer,
    ckpt_path: Optional[Path],
    start_step: int,
) -> Optional[float]:
    run_dir.mkdir(parents=True, exist_ok=True)  # the other ranks may get here before rank 0's lock makes it
    if _launching_rank_zero():
        save_run_record(run_dir, cfg)
        # Rows after the resumed step are logged again; a fresh start begins an empty file.
        truncate_metrics(run_dir / "metrics.csv", start_step)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        log_config(trainer.loggers, cfg)
        params = module.model.num_parameters()
        log.info("run directory: %s", run_dir.resolve())
        log.info(
            "model: %.2fM parameters, %d heads / %d KV heads, KV cache %d bytes per token (bf16)",
            params / 1e6,
            module.model_config.heads,
            module.model_config.kv_heads,
            module.model.kv_cache_bytes_per_token(),
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    stopper = next((c for c in trainer.callbacks if isinstance(c, SignalCheckpoint)), None)
    if stopper is not None and stopper.saved_at_step is not None:
        rank_zero_info(f"stopped at step {stopper.saved_at_step}; continue with: python train.py run_name=... ckpt_path=last")
        return None
    fsdp = isinstance(trainer.strategy, FSDPStrategy)
    final = next(c for c in trainer.callbacks if isinstance(c, FinalValidation))
    logged = trainer.callback_metrics.get("val/loss")
    if final.validated_at_step == trainer.global_step and logged is not None:
        val_loss: Optional[float] = float(logged)
    elif fsdp:
        # Trainer.validate cannot run the FSDP-wrapped model after fit (see FinalValidation).
        log.warning("no validation ran after the final step (%d); no final val/loss", trainer.global_step)
        val_loss = None
    else:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        val_loss = float(results[0]["val/loss"]) if results else None
    if trainer.is_global_zero:
        model = _full_model(module, stopper) if fsdp else module.model
        final_report(model, datamodule.tokenizer, run_dir, val_loss, cfg.get("sample"))
    return val_loss


def _full_model(module: LanguageModel, stopper: Optional[SignalCheckpoint]) -> Optional[MGQATransformer]:
    """An unsharded copy of an FSDP-trained model, from the full-state ``last.ckpt`` of the final step."""
    if stopper is None or not stopper.path.is_file():
        log.warning("no last.ckpt to rebuild the FSDP-trained model from; no sample")
        return None
    state = load_checkpoint(stopper.path)["state_dict"]
    model = MGQATransformer.from_config(module.model_config)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model.eval()
