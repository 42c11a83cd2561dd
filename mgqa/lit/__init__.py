"""Lightning glue: the LightningModule, the DataModule, callbacks and the training entry point."""

from mgqa.lit.datamodule import TextDataModule
from mgqa.lit.module import LanguageModel

__all__ = ["LanguageModel", "TextDataModule"]
