"""Checks of the composed config that Hydra's composition cannot make: value ranges, the keys of the
untyped groups, and settings this machine cannot run. Each raises ``ConfigError`` naming the value and
what is valid, before any data is read or a GPU is touched (``mgqa.lit.run.train`` calls
``validate_config`` first)."""

from __future__ import annotations

import numbers
import typing
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mgqa.data.sources import DataError
from mgqa.lit.module import NonFiniteLossError
from mgqa.model.config import ConfigError

# The errors a user fixes by changing an input (a setting, path, file or checkpoint) or the settings of a
# run that diverged: ``train.py`` prints them as one ``error:`` line, without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError, NonFiniteLossError)



def user_message(err: BaseException) -> str:
    """The message of a user error. One re-raised from a DataLoader worker carries the worker's traceback
    as text ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep only the
    original message, its last line."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


NONFINITE_ACTIONS = ("stop", "skip")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _precisions() -> tuple[str, ...]:
    from lightning.fabric.connector import _PRECISION_INPUT  # noqa: PLC0415 (Lightning's own list)

    names = [str(v) for literal in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(literal)]
    return ("auto", *dict.fromkeys(names))


def check_trainer(trainer: DictConfig) -> None:
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if not (_is_int(max_steps) and (max_steps >= 1 or (max_steps == -1 and _is_int(max_epochs) and max_epochs >= 1))):
        raise ConfigError(
            f"trainer.max_steps must be a positive integer (optimizer steps), or -1 with a positive "
            f"trainer.max_epochs; got {max_steps!r}"
        )
    for key in ("accumulate_grad_batches", "log_every_n_steps", "devices", "num_nodes"):
        value = trainer.get(key)
        if value is None or (key in ("devices", "num_nodes") and not _is_int(value)):
            continue  # devices may also be "auto", -1 or a list: Lightning's own check names those
        if key == "devices" and value == -1:
            continue
        _positive_int(f"trainer.{key}", value)
    interval = trainer.get("val_check_interval")
    if interval is not None and not ((_is_int(interval) and interval >= 1) or (_is_number(interval) and 0 < interval <= 1)):
        raise ConfigError(
            f"trainer.val_check_interval must be a positive integer (training batches) or a fraction in (0, 1] "
            f"of an epoch; got {interval!r}"
        )
    limit = trainer.get("limit_val_batches")
    if limit is not None and not ((_is_int(limit) and limit >= 0) or (_is_number(limit) and 0 <= limit <= 1)):
        raise ConfigError(f"trainer.limit_val_batches must be a batch count >= 0 or a fraction in [0, 1]; got {limit!r}")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        raise ConfigError(f"trainer.gradient_clip_val must be >= 0 (0 or null: no clipping), got {clip!r}")
    precision = trainer.get("precision")
    if str(precision) not in _precisions():
        raise ConfigError(f"trainer.precision={precision!r} is unknown; choose one of {list(_precisions())}")
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(accelerator, str):
        if accelerator not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator={accelerator!r} is unknown; choose one of {list(ACCELERATORS)}")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} needs a CUDA GPU and none is available; use auto or cpu")


def check_optim(optim: DictConfig) -> None:
    unknown = sorted(set(optim) - {"optimizer", "scheduler"})
    if unknown:
        key = unknown[0]
        hint = ""
        for part in ("optimizer", "scheduler"):
            if isinstance(optim.get(part), DictConfig) and key in optim[part]:
                hint = f"; did you mean optim.{part}.{key}?"
                break
        raise ConfigError(f"optim.{key} is not an option: optim takes optimizer and scheduler{hint}")
    opt = optim.get("optimizer")
    if not isinstance(opt, DictConfig) or "_target_" not in opt:
        raise ConfigError("optim.optimizer must be a config with a _target_ (e.g. torch.optim.AdamW)")
    lr = opt.get("lr")
    if not _is_number(lr) or not lr > 0 or lr == float("inf"):
        raise ConfigError(f"optim.optimizer.lr must be a positive number, got {lr!r}")
    if "eps" in opt and not (_is_number(opt.eps) and opt.eps > 0):
        raise ConfigError(f"optim.optimizer.eps must be a positive number, got {opt.eps!r}")
    if "weight_decay" in opt and not (_is_number(opt.weight_decay) and opt.weight_decay >= 0):
        raise ConfigError(f"optim.optimizer.weight_decay must be >= 0, got {opt.weight_decay!r}")
    betas = opt.get("betas")
    if betas is not None:
        values = list(betas) if OmegaConf.is_list(betas) or isinstance(betas, (list, tuple)) else [betas]
        if len(values) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in values):
            raise ConfigError(f"optim.optimizer.betas must be two numbers in [0, 1), got {values!r}")
    sched = optim.get("scheduler")
    if isinstance(sched, DictConfig):
        warmup = sched.get("warmup_steps", 0)
        if not _is_int(warmup) or warmup < 0:
            raise ConfigError(f"optim.scheduler.warmup_steps must be an integer >= 0, got {warmup!r}")
        ratio = sched.get("min_lr_ratio", 0.0)
        if not _is_number(ratio) or not 0 <= ratio <= 1:
            raise ConfigError(f"optim.scheduler.min_lr_ratio must be in [0, 1], got {ratio!r}")


def check_nonfinite(guard: Any) -> None:
    if guard is None:
        return
    unknown = sorted(set(guard) - {"action", "max_skips"})
    if unknown:
        raise ConfigError(f"nonfinite_loss.{unknown[0]} is not an option: nonfinite_loss takes action and max_skips")
    if guard.get("action", "stop") not in NONFINITE_ACTIONS:
        raise ConfigError(f"nonfinite_loss.action must be one of {list(NONFINITE_ACTIONS)}, got {guard.get('action')!r}")
    skips = guard.get("max_skips", 3)
    if not _is_int(skips) or skips < 0:
        raise ConfigError(f"nonfinite_loss.max_skips must be an integer >= 0, got {skips!r}")


def check_sample(sample: Any) -> None:
    if sample is None:
        return
    unknown = sorted(set(sample) - {"prompt", "max_new_tokens", "temperature", "top_k"})
    if unknown:
        raise ConfigError(f"sample.{unknown[0]} is not an option: sample takes prompt, max_new_tokens, temperature, top_k")
    tokens = sample.get("max_new_tokens", 0)
    if not _is_int(tokens) or tokens < 0:
        raise ConfigError(f"sample.max_new_tokens must be an integer >= 0 (0: no sample), got {tokens!r}")
    temperature = sample.get("temperature", 0.8)
    if not _is_number(temperature) or temperature < 0:
        raise ConfigError(f"sample.temperature must be a number >= 0, got {temperature!r}")
    top_k = sample.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"sample.top_k must be a positive integer or null, got {top_k!r}")


def check_backend(cfg: DictConfig) -> None:
    """``model.attn_backend=triton`` must be able to run here: it never falls back."""
    if cfg.model.get("attn_backend") != "triton":
        return
    from mgqa.ops import available_backends  # noqa: PLC0415

    accelerator = cfg.trainer.get("accelerator", "auto")
    if "triton" not in available_backends() or accelerator == "cpu":
        on = "trainer.accelerator=cpu" if accelerator == "cpu" else "this machine"
        raise ConfigError(
            f"model.attn_backend=triton needs a CUDA GPU and mgqa's Triton kernels, not available on {on} "
            f"(available: {available_backends()}); use model.attn_backend=auto"
        )


def validate_config(cfg: DictConfig) -> None:
    """Every check above, in the order a user reads the config."""
    check_backend(cfg)
    check_trainer(cfg.trainer)
    check_optim(cfg.optim)
    check_nonfinite(cfg.get("nonfinite_loss"))
    check_sample(cfg.get("sample"))
    seed = cfg.get("seed")
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
