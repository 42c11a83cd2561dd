"""What ``evaluate.py`` does: loss, perplexity and bits per byte of a checkpoint on a data split."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, TextIO

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm import tqdm

from mgqa.lit.trained import load_trained
from mgqa.model import ConfigError, MGQATransformer

SPLITS = ("val", "train")


def token_bytes(tokenizer: Any, tokens: torch.Tensor) -> int:
    """UTF-8 bytes of the text ``tokens`` (B, N) decode to, row by row (special tokens count zero)."""
    return sum(len(tokenizer.decode(row).encode("utf-8")) for row in tokens.tolist())


@torch.no_grad()
def evaluate_batches(
    model: MGQATransformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], tokenizer: Any, max_batches: Optional[int] = None, progress: bool = True
) -> dict[str, float]:
    """Mean next-token cross-entropy over every target token of ``batches``, its perplexity and bits
    per byte (total nats / ln 2 / UTF-8 bytes of the targets: comparable across tokenizers)."""
    device = next(model.parameters()).device
    model.eval()
    nats, tokens, nbytes, batches_done = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(batches, total=max_batches, desc="evaluating", unit="batch", disable=not progress, file=sys.stderr)
    for inputs, targets in bar:
        if max_batches is not None and batches_done >= max_batches:
            break
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)  # (B, N, V)
        nats += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
        tokens += targets.numel()
        nbytes += token_bytes(tokenizer, targets.cpu())
        batches_done += 1
        bar.set_postfix(loss=f"{nats / tokens:.4f}")
    if tokens == 0:
        raise ConfigError("the split yielded no batch to evaluate (too small for data.batch_size x data.seq_len?)")
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
        "tokens": tokens,
        "bytes": nbytes,
        "batches": batches_done,
        "seconds": time.perf_counter() - start,
    }


def evaluate(cfg: DictConfig, stdout: Optional[TextIO] = None) -> dict[str, Any]:
    """Load the checkpoint, build ``cfg.data``'s ``split`` with the checkpoint's tokenizer, print and save the metrics."""
    stdout = stdout or sys.stdout
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is unknown; choose one of {SPLITS}")
    if cfg.max_batches is not None and (not isinstance(cfg.max_batches, int) or cfg.max_batches < 1):
        raise ConfigError(f"max_batches must be a positive integer or null, got {cfg.max_batches!r}")
    trained = load_trained(cfg.get("ckpt_path"), cfg.get("run_name"), cfg.output_root, cfg.device, cfg.get("attn_backend"))
    model_cfg = trained.model.config
    seq_len = cfg.data.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len ({seq_len}) exceeds the checkpoint's model.max_seq_len ({model_cfg.max_seq_len})")
    # The data module builds its tokenizer from a name; the checkpoint's own replaces it before any data is read.
    datamodule = instantiate(cfg.data, seq_len=seq_len, tokenizer="byte", eot_token=None)
    datamodule.tokenizer = trained.tokenizer
    datamodule.check_files()
    print(f"checkpoint: {trained.path} (step {trained.step}); evaluating the {cfg.split} split", file=sys.stderr)
    datamodule.build_datasets()
    loader = datamodule.val_dataloader() if cfg.split == "val" else datamodule.train_dataloader()
    metrics = evaluate_batches(trained.model, loader, trained.tokenizer, cfg.max_batches)
    result = {
        "checkpoint": str(trained.path),
        "step": trained.step,
        "split": cfg.split,
        "seq_len": seq_len,
        "kv_heads": model_cfg.kv_heads,
        "heads": model_cfg.heads,
        **metrics,
    }
    out = Path(cfg.out) if cfg.get("out") else trained.path.parent.parent / f"eval_{cfg.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{cfg.split}: loss {metrics['loss']:.4f} nats/token, perplexity {metrics['perplexity']:.2f}, "
        f"{metrics['bits_per_byte']:.4f} bits/byte ({metrics['tokens']} tokens)",
        file=stdout,
    )
    print(f"wrote {out}", file=stdout)
    return result
