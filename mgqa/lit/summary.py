"""The model summary printed when fitting starts: layers and parameter counts, without a FLOPs column.

Lightning's summary counts FLOPs only by running ``example_input_array`` through the model, which mgqa
does not set (under FSDP rank 0 alone would run a sharded forward and hang), so its table would end
in ``Total FLOPs: 0``. The model's size that matters for GQA (KV-cache bytes per token) is logged by
``mgqa.lit.run.train`` beside it.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count

log = logging.getLogger("mgqa")


class ModelSummary(LightningModelSummary):
    """Lightning's ``ModelSummary`` callback (``max_depth`` levels of modules) with the FLOPs column and
    total left out when nothing measured them."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        log.info("model summary:\n%s", format_summary(summary_data, total_parameters, trainable_parameters,
                                                      model_size, total_flops))


def format_summary(
    columns: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int, model_size: float,
    total_flops: int = 0,
) -> str:
    """The summary table as text: one row per module, then the parameter totals."""
    if not total_flops:
        columns = [(name, values) for name, values in columns if name != "FLOPs"]
    widths = [max(len(name), *(len(str(v)) for v in values)) if values else len(name) for name, values in columns]
    rows = [[name for name, _ in columns]] + [list(map(str, row)) for row in zip(*(v for _, v in columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    totals = [
        (get_human_readable_count(trainable_parameters), "trainable parameters"),
        (get_human_readable_count(total_parameters - trainable_parameters), "non-trainable parameters"),
        (get_formatted_model_size(model_size), "MB of parameters (estimated)"),
    ]
    if total_flops:
        totals.append((get_human_readable_count(total_flops), "FLOPs per forward of the example input"))
    lines += [f"{value:<10}{label}" for value, label in totals]
    return "\n".join(lines)
