"""End-of-run report: final validation loss, a generated sample, and a loss-curve PNG."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("mgqa")


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {column: [(step, value), ...]} for the numeric columns that have values."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row["step"])) if row.get("step") else None
            if step is None:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_loss_curve(metrics_csv: Path, out_png: Path) -> Optional[Path]:
    """Train and validation loss against optimizer step; returns the PNG path, or None without data."""
    if not metrics_csv.is_file():
        return None
    import matplotlib  # noqa: PLC0415 (only needed at the end of a run)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    series = read_metrics(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        if series.get(key):
            steps, values = zip(*series[key])
            ax.plot(steps, values, style, label=key, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def generate_sample(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float, top_k: Optional[int]) -> str:
    if torch.cuda.is_available():
        model.cuda()  # Lightning moves the model back to the CPU after fitting
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = model.generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return prompt + tokenizer.decode(tokens[0].tolist())


def final_report(model: Any, tokenizer: Any, run_dir: Path, val_loss: Optional[float], sample_cfg: Any) -> None:
    """Print the final validation loss, write a sample from ``model`` (an ``MGQATransformer``) and the loss curve."""
    if val_loss is not None:
        print(f"final val/loss {val_loss:.4f} nats/token (perplexity {math.exp(min(val_loss, 50)):.2f})")
    if model is not None and sample_cfg and sample_cfg.get("max_new_tokens", 0) > 0:
        text = generate_sample(
            model,
            tokenizer,
            sample_cfg.get("prompt") or "\n",
            sample_cfg.max_new_tokens,
            sample_cfg.get("temperature", 0.8),
            sample_cfg.get("top_k"),
        )
        (run_dir / "sample.txt").write_text(text, encoding="utf-8")
        print("sample:\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
    png = plot_loss_curve(run_dir / "metrics.csv", run_dir / "loss_curve.png")
    if png is not None:
        print(f"loss curve: {png}")
    print(f"run directory: {run_dir.resolve()}")
