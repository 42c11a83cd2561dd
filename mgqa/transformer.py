"""The original package's import path: ``from mgqa.transformer import MGQATransformer, Decoder``."""

from mgqa.model import Decoder, MGQATransformer

__all__ = ["Decoder", "MGQATransformer"]
