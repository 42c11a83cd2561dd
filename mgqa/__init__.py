"""mgqa: train, sweep and compare grouped-query-attention decoders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mgqa._lazy import lazy_attributes

if TYPE_CHECKING:
    from mgqa.model import ConfigError, Decoder, MGQATransformer, ModelConfig

__all__ = ["ConfigError", "Decoder", "MGQATransformer", "ModelConfig"]
__version__ = "0.1.0"
# The model, and torch with it, loads on first use.
__getattr__ = lazy_attributes(__name__, dict.fromkeys(__all__, "mgqa.model"))
