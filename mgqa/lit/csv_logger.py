"""A CSV logger whose ``metrics.csv`` survives a resume in the same run directory."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (and its columns) and appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(set(header))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it.

    On resume, ``truncate_metrics`` first drops the rows of steps the resumed run will log again.
    """

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_metrics(metrics_csv: Path, from_step: int) -> None:
    """Drop rows with ``step >= from_step`` (written after the checkpoint being resumed), atomically."""
    if not metrics_csv.is_file():
        return
    with open(metrics_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < from_step]
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".csv", dir=metrics_csv.parent)
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, metrics_csv)
