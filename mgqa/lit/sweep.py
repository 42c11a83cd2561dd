"""Multirun sweeps: the value a job returns to the sweeper, and the end-of-sweep summary.

``SweepSummary`` is a Hydra callback (registered in conf/train.yaml under ``hydra.callbacks``). After every
job of a ``-m`` sweep it appends a row to ``<sweep dir>/summary.csv`` and redraws ``summary.png`` (final
validation loss against training throughput, one point per job: the GQA quality/speed picture); at the end
it prints the table. A failed job is reported and, unless ``fail_fast``, the sweep goes on; a sweep with a
failed job exits non-zero after its table, with a one-line ``error:`` and no traceback.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("mgqa")

COLUMNS = ("job", "overrides", "status", "val_loss", "tokens_per_s", "params", "kv_cache_bytes_per_token", "run_dir")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user fixes by changing an input (``train.py`` prints them as one line)."""
    from mgqa.lit.validate import USER_ERRORS  # noqa: PLC0415 (imports torch and Lightning)

    return USER_ERRORS


def last_metric(metrics_csv: Path, name: str) -> Optional[float]:
    """The last logged value of column ``name`` in a run's metrics.csv (None without one)."""
    if not metrics_csv.is_file():
        return None
    value = None
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(name) not in (None, ""):
                value = float(row[name])
    return value


def objective(cfg: DictConfig, val_loss: Optional[float]) -> Optional[float]:
    """What a job returns to the sweeper: ``optimized_metric`` (the last logged value in metrics.csv),
    or the final validation loss when none is set. Optuna minimises or maximises it."""
    metric = cfg.get("optimized_metric")
    if not metric or metric == "val/loss":
        return val_loss
    value = last_metric(Path(cfg.run_dir) / "metrics.csv", metric)
    if value is None:
        raise ValueError(f"optimized_metric={metric!r} was never logged to {Path(cfg.run_dir) / 'metrics.csv'}")
    return value


def throughput(metrics_csv: Path) -> Optional[float]:
    """Median ``train/tokens_per_s`` of a run, leaving out the first window (start-up, compilation)."""
    values = []
    if metrics_csv.is_file():
        with open(metrics_csv, newline="") as fh:
            values = [float(r["train/tokens_per_s"]) for r in csv.DictReader(fh) if r.get("train/tokens_per_s")]
    values = values[1:] or values
    return statistics.median(values) if values else None


def model_size(config: DictConfig) -> tuple[Optional[int], Optional[int]]:
    """(parameters, KV-cache bytes per token) of the job's model, built on the meta device (no memory)."""
    import torch  # noqa: PLC0415

    from mgqa.lit.run import resolve_model_config  # noqa: PLC0415
    from mgqa.model import MGQATransformer  # noqa: PLC0415

    try:
        with torch.device("meta"):
            model = MGQATransformer.from_config(resolve_model_config(config))
        return model.num_parameters(), model.kv_cache_bytes_per_token()
    except Exception:  # noqa: BLE001 (a job with a bad model config has no size; the job already failed)
        return None, None


def job_row(config: DictConfig, job_return: JobReturn) -> dict[str, Any]:
    run_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
    ok = job_return.status == JobStatus.COMPLETED
    params, kv_bytes = model_size(config)
    val_loss = last_metric(run_dir / "metrics.csv", "val/loss") if ok else None
    if ok and isinstance(job_return.return_value, float) and not config.get("optimized_metric"):
        val_loss = job_return.return_value
    return {
        "job": job_return.hydra_cfg.hydra.job.num,
        "overrides": " ".join(job_return.overrides or []),
        "status": "ok" if ok else f"failed: {type(job_return._return_value).__name__}: {job_return._return_value}",
        "val_loss": val_loss,
        "tokens_per_s": throughput(run_dir / "metrics.csv") if ok else None,
        "params": params,
        "kv_cache_bytes_per_token": kv_bytes,
        "run_dir": str(run_dir),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "val_loss":
            return f"{value:.4f}"
        if key == "tokens_per_s":
            return f"{value:,.0f}"
        if key == "params":
            return f"{value / 1e6:.2f}M"
        return str(value)

    keys = COLUMNS[:-1]
    header = ("job", "overrides", "status", "val/loss", "tokens/s", "params", "KV B/token")
    cells = [[cell(k, r[k])[:60] for k in keys] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], out_png: Path) -> Optional[Path]:
    """Final validation loss against training throughput, one labelled point per finished job."""
    points = [r for r in rows if r["val_loss"] is not None and r["tokens_per_s"] is not None]
    if not points:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["tokens_per_s"] for r in points], [r["val_loss"] for r in points])
    for r in points:
        ax.annotate(r["overrides"] or f"job {r['job']}", (r["tokens_per_s"], r["val_loss"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("training throughput (tokens/s)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


class SweepSummary(Callback):
    """Summarises a multirun sweep: ``summary.csv``, ``summary.png`` and a printed table in the sweep dir.

    ``fail_fast``: stop the sweep at the first failed job (default: report it and run the rest).
    """

    def __init__(self, fail_fast: bool = False) -> None:
        self.fail_fast = fail_fast
        self.rows: list[dict[str, Any]] = []
        self._exiting = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows, self._exiting = [], False

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.hydra_cfg is None or job_return.hydra_cfg.hydra.mode != RunMode.MULTIRUN:
            return  # a single run (also each extra DDP rank of a sweep job) has nothing to summarise
        row = job_row(config, job_return)
        self.rows.append(row)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with open(sweep_dir / "summary.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        plot_sweep(self.rows, sweep_dir / "summary.png")
        if row["status"] != "ok":
            error = job_return._return_value
            # A wrong input is its one-line message; anything else keeps its traceback in the log.
            trace = error if isinstance(error, BaseException) and not isinstance(error, user_errors()) else None
            log.error("sweep job %s (%s) %s", row["job"], row["overrides"], row["status"], exc_info=trace)
            # The failure is recorded here. Hydra's sweepers re-raise a failed job's exception, which ends
            # the sweep with a traceback before the summary: the job returns NaN instead (Optuna records a
            # failed trial), and the sweep exits non-zero after its table (on_multirun_end).
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = float("nan")
            if self.fail_fast:
                self._exiting = True  # this exit names the job, not the count
                self.on_multirun_end(config)
                raise SystemExit(f"error: sweep job {row['job']} ({row['overrides']}) failed and fail_fast is set")
        else:
            loss = "-" if row["val_loss"] is None or not math.isfinite(row["val_loss"]) else f"{row['val_loss']:.4f}"
            log.info("sweep job %s (%s) done: val/loss %s", row["job"], row["overrides"], loss)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.rows:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = sum(r["status"] != "ok" for r in self.rows)
        print(f"sweep summary ({len(self.rows)} jobs, {failed} failed):")
        print(format_table(self.rows))
        print(f"summary: {sweep_dir / 'summary.csv'}, plot: {sweep_dir / 'summary.png'}")
        if failed and not self._exiting:
            self._exiting = True
            raise SystemExit(f"error: {failed} of {len(self.rows)} sweep jobs failed (see the table above)")
