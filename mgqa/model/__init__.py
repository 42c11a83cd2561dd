"""Pure PyTorch modules: no Lightning, Hydra or Triton here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mgqa._lazy import lazy_attributes
from mgqa.model.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    from mgqa.model.attention import GroupedQueryAttention, KVCache
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
# Everything but the config needs torch: loaded on first use, so that a config is read and checked
# without it.
__getattr__ = lazy_attributes(__name__, {
    "GroupedQueryAttention": "mgqa.model.attention",
    "KVCache": "mgqa.model.attention",
    "Block": "mgqa.model.decoder",
    "Decoder": "mgqa.model.decoder",
    "StaticKVCache": "mgqa.model.static_cache",
    "MGQATransformer": "mgqa.model.transformer",
})
