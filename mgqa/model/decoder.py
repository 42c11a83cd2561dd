"""Pre-norm decoder blocks and the ``Decoder`` stack (the seed API's ``attn_layers``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mgqa.model.attention import GroupedQueryAttention, KVCache
from mgqa.model.config import ConfigError, ModelConfig
from mgqa.model.layers import FeedForward, make_norm


class Block(nn.Module):
    """x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias)
        self.attn = GroupedQueryAttention(
            cfg.dim,
            cfg.heads,
            cfg.kv_heads,
            cfg.resolved_head_dim,
            bias=cfg.bias,
            dropout=cfg.dropout,
            backend=cfg.attn_backend,
            layer_index=layer_index,
        )
        self.ff_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias)
        self.ff = FeedForward(cfg.dim, cfg.ff, cfg.ff_mult, cfg.bias, cfg.dropout)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            # Inside forward, so that a compiled block traces the checkpoint with the rest (as
            # torchtitan applies it per block); non-reentrant, so it nests under any strategy.
            # The RNG state is replayed, so dropout masks are the same in the recomputation.
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope, cache)

    def _forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope=rope, cache=cache)
        return x + self.ff(self.ff_norm(x))


class Decoder(nn.Module):
    """A causal stack of ``depth`` GQA blocks followed by a final norm.

    ``Decoder(dim=512, depth=12, heads=8, attn_kv_heads=2)`` as in the original package; any other
    ``ModelConfig`` field (``pos_emb``, ``norm``, ``ff``, ``bias``, ``dropout``, ...) may be passed
    by name. ``kv_heads`` is accepted as a synonym of ``attn_kv_heads``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        attn_kv_heads: Optional[int] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if attn_kv_heads is not None and options.get("kv_heads") not in (None, attn_kv_heads):
            raise ConfigError(f"attn_kv_heads={attn_kv_heads} and kv_heads={options['kv_heads']} disagree")
        if attn_kv_heads is not None:
            options["kv_heads"] = attn_kv_heads
        for name in ("num_tokens", "max_seq_len"):
            if name in options:
                raise ConfigError(f"{name} belongs to MGQATransformer(...), not Decoder(...)")
        # A complete config for validation; num_tokens / max_seq_len are filled by the transformer.
        self.config = ModelConfig.from_dict({"dim": dim, "depth": depth, "heads": heads, **options})
        self.blocks = nn.ModuleList(Block(self.config, i) for i in range(depth))
        self.norm = make_norm(self.config.norm, dim, self.config.norm_eps, self.config.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        for block in self.blocks:
            x = block(x, rope=rope, cache=cache)
        return self.norm(x)
