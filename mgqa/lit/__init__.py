"""Lightning glue: the LightningModule, the DataModule, callbacks and the training entry point."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mgqa._lazy import lazy_attributes

if TYPE_CHECKING:
    from mgqa.lit.datamodule import TextDataModule
    from mgqa.lit.module import LanguageModel

__all__ = ["LanguageModel", "TextDataModule"]
# They import Lightning and torch: loaded on first use, so that the configs and the command-line
# checks of this package are read without them.
__getattr__ = lazy_attributes(__name__, {"LanguageModel": "mgqa.lit.module", "TextDataModule": "mgqa.lit.datamodule"})
