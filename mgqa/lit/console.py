"""What a run prints: Lightning's and PyTorch's messages that say nothing about the run stay off the console.

Each filter names one message and why it is not the user's problem; everything else is left alone.
"""

from __future__ import annotations

import logging
import warnings

# Lightning prints an advertisement for its hosted logger (``litlogger``) on every run that doesn't use it.
_ADVERTISEMENTS = ("💡 Tip:",)
# ``rank_zero_info`` logs through whichever of these two loggers Lightning set up last.
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropAdvertisements(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTISEMENTS)


_FILTER = _DropAdvertisements()


def quiet_console() -> None:
    """Install the filters (idempotent); ``train.py`` calls it before building the trainer."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    # Lightning's own pytree helper (lightning/pytorch/utilities/_pytree.py) still builds torch's deprecated
    # ``LeafSpec``; the warning is addressed to Lightning, and nothing a user changes makes it go away.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
