"""A trained model out of a checkpoint, for ``generate.py``, ``evaluate.py``, ``export.py`` and ``init.from``.

A checkpoint is self-contained: its hyperparameters hold the model config and the tokenizer's state,
and ``TokenizerInCheckpoint`` stores the tokenizer itself (``tokenizer.json`` text) beside them, so
it loads without the files or paths of the run that wrote it. Weights load on the CPU first, then
move to any device, whatever the run trained on; DDP and FSDP (``state_dict_type: full``) write the
same single file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from mgqa.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer
from mgqa.lit.checkpoint import CHECKPOINT_SUFFIX, CheckpointError, checkpoint_candidates, load_checkpoint
from mgqa.model import ConfigError, MGQATransformer, ModelConfig

log = logging.getLogger("mgqa")

TOKENIZER_KEY = "tokenizer_json"
# Prefixes a wrapped or compiled module adds to parameter names.
WRAPPER_PREFIXES = ("_forward_module.", "_orig_mod.", "module.")


class TokenizerInCheckpoint(L.Callback):
    """Stores the run's tokenizer (``tokenizer.json`` text) in every checkpoint; the byte tokenizer
    needs no file and stores nothing."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if isinstance(tokenizer, HFTokenizer):
            checkpoint[TOKENIZER_KEY] = tokenizer.to_json()


@dataclass
class Trained:
    """A model loaded from a checkpoint, with its tokenizer and where it came from."""

    model: MGQATransformer
    tokenizer: ByteTokenizer | HFTokenizer
    path: Path
    step: int
    hparams: dict[str, Any]


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``run_name=X`` means: the best by validation loss, else the newest."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist (set output_root or run_name)")
    best = sorted(run_dir.glob(f"checkpoints/best-*{CHECKPOINT_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
    if len(best) > 1:  # save_top_k > 1: the newest file knows every kept file's score
        scores = _best_scores(best[-1])
        ranked = [p for p in best if str(p) in scores or p.name in scores]
        if ranked:
            return min(ranked, key=lambda p: scores.get(str(p), scores.get(p.name)))
    if best:
        return best[-1]
    others = checkpoint_candidates(run_dir)
    if not others:
        raise FileNotFoundError(f"run directory {run_dir} holds no checkpoints (looked in {run_dir / 'checkpoints'})")
    log.warning("%s has no best-* checkpoint; using the newest, %s", run_dir, others[0].name)
    return others[0]


def _best_scores(path: Path) -> dict[str, float]:
    try:
        callbacks = load_checkpoint(path).get("callbacks", {})
    except CheckpointError:
        return {}
    for state in callbacks.values():
        if isinstance(state, dict) and state.get("best_k_models"):
            # Keyed by the paths the run wrote; best_checkpoint also tries file names, if the directory moved.
            scores = {str(k): float(v) for k, v in state["best_k_models"].items()}
            return {**{Path(k).name: v for k, v in scores.items()}, **scores}
    return {}


def resolve_checkpoint(ckpt_path: Optional[str], run_name: Optional[str], output_root: str) -> Path:
    """``ckpt_path`` (a file, or a run directory) or else ``run_name``'s best checkpoint."""
    if ckpt_path:
        path = Path(ckpt_path)
        if path.is_dir() and (path / "meta.pt").is_file():
            raise CheckpointError(
                f"{path} is a sharded FSDP checkpoint; make one file with "
                f"`python -m lightning.pytorch.utilities.consolidate_checkpoint {path}`"
            )
        return best_checkpoint(path) if path.is_dir() else path
    if run_name:
        return best_checkpoint(Path(output_root) / str(run_name))
    raise ConfigError("give ckpt_path=<file or run directory> or run_name=<a run under output_root>")


def tokenizer_from_checkpoint(checkpoint: dict[str, Any], path: Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a checkpoint carries; older checkpoints without it rebuild it by name."""
    state = (checkpoint.get("hyper_parameters") or {}).get("tokenizer") or {"name": "byte"}
    if state.get("name") == "byte":
        return ByteTokenizer()
    if TOKENIZER_KEY in checkpoint:
        return HFTokenizer.from_json(checkpoint[TOKENIZER_KEY], name=state["name"], eot_token=state.get("eot_token"))
    try:
        tokenizer = build_tokenizer(state["name"], state.get("eot_token"))
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(f"{path} does not carry its tokenizer and {state['name']!r} cannot be loaded: {err}") from err
    if state.get("sha256") and tokenizer.state().get("sha256") != state["sha256"]:
        raise CheckpointError(f"{path} was trained with another tokenizer than the one now at {state['name']!r}")
    return tokenizer


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The ``MGQATransformer`` weights of a Lightning checkpoint (``model.`` prefix and wrappers removed)."""
    out = {}
    for key, value in checkpoint["state_dict"].items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith("model."):
            out[key.removeprefix("model.")] = value
    return out


def load_trained(
    ckpt_path: Optional[str] = None,
    run_name: Optional[str] = None,
    output_root: str = "outputs",
    device: str = "auto",
    attn_backend: Optional[str] = None,
) -> Trained:
    """Model and tokenizer from ``ckpt_path`` or ``run_name``'s best checkpoint, in eval mode on ``device``
    (``auto``: CUDA if available). ``attn_backend`` overrides the one the run trained with."""
    target = resolve_device(device)  # a wrong device fails before a large file is read
    path = resolve_checkpoint(ckpt_path, run_name, output_root)
    checkpoint = load_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not hparams.get("model"):
        raise CheckpointError(f"checkpoint {path} carries no model hyperparameters; it was not written by mgqa")
    values = dict(hparams["model"])
    if attn_backend is not None:
        values["attn_backend"] = attn_backend
    model = MGQATransformer.from_config(ModelConfig.from_dict(values))
    try:
        model.load_state_dict(model_state(checkpoint), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: weights do not match its model config ({str(err).splitlines()[0]})") from err
    return Trained(
        model=model.to(target).eval(),
        tokenizer=tokenizer_from_checkpoint(checkpoint, path),
        path=path,
        step=int(checkpoint.get("global_step", 0)),
        hparams=hparams,
    )


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` without a GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available; use device=cpu or auto")
    if not str(device).startswith(("cpu", "cuda")):
        raise ConfigError(f"device={device!r} is unknown; choose auto, cpu or cuda[:N]")
    return torch.device(device)
