"""Multirun sweeps: the value a job returns to the sweeper, and the end-of-sweep summary.

``SweepSummary`` is a Hydra callback (registered in conf/train.yaml under ``hydra.callbacks``). After every
job of a ``-m`` sweep it appends a row to ``<sweep dir>/summary.csv`` and redraws ``summary.png`` (final
validation loss against training throughput, one point per job: the GQA quality/speed picture); at the end
it prints the table. Jobs are labelled by the overrides that vary across the sweep (``kv_heads=1``): in the
plot (a second panel: loss against KV-cache bytes per token) and in the table (a column per varying
override). At the start it prints the command that resumes the sweep if it is interrupted. A failed job is
reported and, unless ``fail_fast``, the sweep goes on; a sweep with a failed job exits non-zero after its
table, with a one-line ``error:`` and no traceback.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from mgqa.atomic import atomic_write

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


# An override inside the space-joined "overrides" column starts where a space is followed by `key=`.
_OVERRIDE_START = re.compile(r" (?=[+~]*[\w./@-]+=)")


def parse_overrides(joined: str) -> dict[str, str]:
    """``"model.kv_heads=1 trainer.max_steps=40"`` -> ``{"model.kv_heads": "1", "trainer.max_steps": "40"}``."""
    pairs = [part.split("=", 1) for part in _OVERRIDE_START.split(joined.strip()) if "=" in part]
    return {key.lstrip("+~"): value for key, value in pairs}


def varying_keys(rows: list[dict[str, Any]], sweep_keys: Iterable[str] = ()) -> list[str]:
    """The override keys that tell the jobs apart: the swept ones and any whose value differs between jobs
    (a job without the key counts as a different value); keys shared by every job are left out."""
    parsed = [parse_overrides(r["overrides"] or "") for r in rows]
    keys = list(dict.fromkeys([*sweep_keys, *(k for p in parsed for k in p)]))
    swept = set(sweep_keys)
    return [k for k in keys if k in swept or len({p.get(k) for p in parsed}) > 1]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key by its last part (``model.kv_heads`` -> ``kv_heads``) unless two keys would share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (name if last.count(name) == 1 else k) for k, name in zip(keys, last)}


def job_labels(rows: list[dict[str, Any]], sweep_keys: Iterable[str] = ()) -> list[str]:
    """One label per job from the overrides that vary across the sweep, e.g. ``kv_heads=1``."""
    keys = varying_keys(rows, sweep_keys)
    names = short_names(keys)
    labels = []
    for r in rows:
        parsed = parse_overrides(r["overrides"] or "")
        label = " ".join(f"{names[k]}={parsed[k]}" for k in keys if k in parsed)
        labels.append(label or f"job {r['job']}")
    return labels


def format_table(rows: list[dict[str, Any]], sweep_keys: Iterable[str] = ()) -> str:
    """The summary as a text table: one column per varying override, then status and results."""

    def cell(key: str, value: Any) -> str:
        if value is None or value == "":
            return "-"
        if key == "val_loss":
            return f"{float(value):.4f}"
        if key == "tokens_per_s":
            return f"{float(value):,.0f}"
        if key == "params":
            return f"{int(value) / 1e6:.2f}M"
        if key == "status":
            return str(value)[:60]
        return str(value)

    keys = varying_keys(rows, sweep_keys)
    names = short_names(keys)
    results = ("status", "val_loss", "tokens_per_s", "params", "kv_cache_bytes_per_token")
    header = ["job", *(names[k] for k in keys), "status", "val/loss", "tokens/s", "params", "KV B/token"]
    cells = []
    for r in rows:
        parsed = parse_overrides(r["overrides"] or "")
        cells.append([str(r["job"]), *(parsed.get(k, "-") for k in keys), *(cell(k, r[k]) for k in results)])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


# Up to this many jobs, each point carries its label; beyond, points carry the job number and a key beside
# the axes lists the labels, so that labels never overlap or squeeze the axes.
DIRECT_LABELS_MAX = 10
LABEL_CHARS = 40


def sweep_figure(rows: list[dict[str, Any]], sweep_keys: Iterable[str] = ()) -> Optional[Any]:
    """The sweep's picture: final validation loss against training throughput and against KV-cache bytes per
    token (the GQA trade-off), one point per finished job, labelled by the overrides that vary."""
    labels = job_labels(rows, sweep_keys)
    done = [(r, label) for r, label in zip(rows, labels) if _number(r["val_loss"]) is not None]
    if not done:
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import matplotlib.ticker  # noqa: PLC0415

    direct = len(done) <= DIRECT_LABELS_MAX
    colors = plt.get_cmap("tab10" if len(done) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels = (("tokens_per_s", "training throughput (tokens/s)"), ("kv_cache_bytes_per_token", "KV cache (bytes/token, bf16)"))
    for ax, (key, xlabel) in zip(axes, panels):
        xs = []
        for i, (r, label) in enumerate(done):
            x = _number(r[key])
            if x is None:
                continue
            xs.append(x)
            ax.scatter([x], [_number(r["val_loss"])], color=colors(i % colors.N), s=36, zorder=3,
                       label=_shorten(f"{r['job']}: {label}") if ax is axes[0] else None)
            text = _shorten(label) if direct else str(r["job"])
            ax.annotate(text, (x, _number(r["val_loss"])), fontsize=8, xytext=(5, 4), textcoords="offset points")
        if key == "kv_cache_bytes_per_token" and xs and max(xs) >= 4 * min(xs):
            ax.set_xscale("log", base=2)  # KV heads come in powers of two
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 256, not 2^8
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.12)  # room for the labels at the edges
    axes[0].set_ylabel("final validation loss (nats/token)")
    fig.suptitle(f"sweep of {len(done)} job{'s' if len(done) != 1 else ''}", fontsize=10)
    if not direct:
        fig.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False,
                   ncol=1 if len(done) <= 25 else 2, title="job: overrides", title_fontsize=8)
    fig.tight_layout()
    return fig


def plot_sweep(rows: list[dict[str, Any]], out_png: Path, sweep_keys: Iterable[str] = ()) -> Optional[Path]:
    """Write ``sweep_figure`` to ``out_png``; the PNG's Description names its axes and the points' labels."""
    fig = sweep_figure(rows, sweep_keys)
    if fig is None:
        return None
    import matplotlib.pyplot as plt  # noqa: PLC0415

    axes_names = "; ".join(f"{ax.get_xlabel()} vs {fig.axes[0].get_ylabel()}" for ax in fig.axes[:2])
    labels = ", ".join(job_labels(rows, sweep_keys))
    fig.savefig(out_png, dpi=110, bbox_inches="tight",
                metadata={"Title": "mgqa sweep summary", "Description": f"axes: {axes_names}. jobs: {labels}"})
    plt.close(fig)
    return out_png


def _number(value: Any) -> Optional[float]:
    """A finite float from a row's cell (a number, or text read back from summary.csv), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _shorten(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def sweep_keys_of(config: DictConfig) -> list[str]:
    """The keys a sweep varies: its sweep overrides (``model.kv_heads=1,2,8``) and ``hydra.sweeper.params``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    keys = []
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 (labels then come from the values that differ)
        pass
    params = config.hydra.sweeper.get("params") or {}
    return list(dict.fromkeys([*keys, *params]))


def resume_command(config: DictConfig) -> str:
    """The command line that runs this sweep again in the same directory, each job resuming from its newest
    checkpoint (``ckpt_path=last``; a job that never started starts fresh, one that finished only validates)."""
    task = [o for o in config.hydra.overrides.task if not o.startswith("ckpt_path=")]
    hydra = [o for o in config.hydra.overrides.hydra if not o.startswith(("hydra.sweep.dir=", "hydra.mode="))]
    args = [*task, *hydra, f"hydra.sweep.dir={Path(config.hydra.sweep.dir).resolve()}", "ckpt_path=last"]
    return " ".join(["python", sys.argv[0] or "train.py", "-m", *map(shlex.quote, args)])


def read_summary(path: Path) -> list[dict[str, Any]]:
    """The rows of a sweep's summary.csv (text cells; the table and plot accept them)."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class SweepSummary(Callback):
    """Summarises a multirun sweep: ``summary.csv``, ``summary.png`` and a printed table in the sweep dir.

    ``fail_fast``: stop the sweep at the first failed job (default: report it and run the rest).
    """

    def __init__(self, fail_fast: bool = False) -> None:
        self.fail_fast = fail_fast
        self.rows: list[dict[str, Any]] = []
        self._exiting = False
        self.sweep_keys: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.rows, self._exiting = [], False
        self.sweep_keys = sweep_keys_of(config)
        # Hydra's basic sweeper runs the same jobs again; a search (Optuna) samples new ones and resumes
        # through its own storage instead.
        if str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            log.info("sweep directory: %s; if the sweep is interrupted, resume it with:\n  %s",
                     Path(config.hydra.sweep.dir).resolve(), resume_command(config))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.hydra_cfg is None or job_return.hydra_cfg.hydra.mode != RunMode.MULTIRUN:
            return  # a single run (also each extra DDP rank of a sweep job) has nothing to summarise
        if rank_zero_only.rank != 0:
            return  # under SLURM every rank of a DDP job ends the job; rank 0 reports it
        row = job_row(config, job_return)
        sweep_dir = Path(config.hydra.sweep.dir)
        self.rows = record_row(sweep_dir, row)
        atomic_write(sweep_dir / "summary.csv", lambda tmp: _write_csv(self.rows, tmp))
        atomic_write(sweep_dir / "summary.png", lambda tmp: plot_sweep(self.rows, tmp, self.sweep_keys))
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
        sweep_dir = Path(config.hydra.sweep.dir)
        self.rows = recorded_rows(sweep_dir)  # jobs may have run in other processes (submitit launchers)
        if not self.rows:
            return
        failed = sum(r["status"] != "ok" for r in self.rows)
        print(f"sweep summary ({len(self.rows)} jobs, {failed} failed):")
        print(format_table(self.rows, self.sweep_keys))
        print(f"summary: {sweep_dir / 'summary.csv'}, plot: {sweep_dir / 'summary.png'}")
        if failed and not self._exiting:
            self._exiting = True
            raise SystemExit(f"error: {failed} of {len(self.rows)} sweep jobs failed (see the table above)")


# Each job keeps its row in its own directory, so that jobs running in other processes or on other machines
# (hydra-submitit-launcher) add to one summary, and a resumed sweep replaces its jobs' rows.
ROW_FILE = "summary_row.json"


def record_row(sweep_dir: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Store ``row`` in its job's directory; return the rows of every job of the sweep, by job number."""
    job_dir = Path(row["run_dir"])
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(job_dir / ROW_FILE, lambda tmp: tmp.write_text(json.dumps(row)))
    return recorded_rows(sweep_dir)


def recorded_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sweep_dir.glob(f"*/{ROW_FILE}"):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # another job is replacing it right now; its own redraw includes it
    return sorted(rows, key=lambda r: int(r["job"]))


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


