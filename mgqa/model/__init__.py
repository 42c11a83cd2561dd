"""Pure PyTorch modules: no Lightning, Hydra or Triton here."""

from mgqa.model.attention import GroupedQueryAttention, KVCache
from mgqa.model.config import ConfigError, ModelConfig
from mgqa.model.decoder import Block, Decoder
from mgqa.model.static_cache import StaticKVCache
from mgqa.model.transformer import MGQATransformer

__all__ = [
    "Block",
    "ConfigError",
    "Decoder",
    "GroupedQueryAttention",
    "KVCache",
    "MGQATransformer",
    "ModelConfig",
    "StaticKVCache",
]
