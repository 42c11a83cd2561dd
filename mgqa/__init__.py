"""mgqa: train, sweep and compare grouped-query-attention decoders."""

from mgqa.model import ConfigError, Decoder, MGQATransformer, ModelConfig

__all__ = ["ConfigError", "Decoder", "MGQATransformer", "ModelConfig"]
__version__ = "0.1.0"
