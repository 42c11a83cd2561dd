"""Grouped-query self-attention and its KV cache."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mgqa import ops
from mgqa.model.layers import apply_rotary, project
from mgqa.model.static_cache import StaticKVCache


class KVCache:
    """Preallocated keys and values for every layer: (B, Hkv, capacity, D) each.

    Holds Hkv heads, not H: the memory a GQA model saves at inference. ``length`` counts the
    positions already written; ``advance`` moves it after every layer has stored a step.
    """

    def __init__(
        self,
        batch: int,
        depth: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.capacity = capacity
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, n, D) after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; writing up to position {end}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]  # (B, Hkv, end, D)

    def advance(self, n: int) -> None:
        self.length += n


class GroupedQueryAttention(nn.Module):
    """Multi-head attention whose H query heads share Hkv key/value heads in groups of H / Hkv.

    K/V projections are Hkv * head_dim wide; query head h reads KV head h // (H / Hkv).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        bias: bool,
        dropout: float,
        backend: str,
        layer_index: int,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dropout = dropout
        self.backend = backend
        self.layer_index = layer_index
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * head_dim, bias=bias)  # fused q, k, v
        self.out = nn.Linear(heads * head_dim, dim, bias=bias)
        self.out_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        cache: Optional[KVCache | StaticKVCache] = None,
    ) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim). ``rope``: cos, sin (N, D) for these positions, or
        (B, 1, N, D) when every sequence sits at its own positions (a ``StaticKVCache``)."""
        batch, n, _ = x.shape
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = project(self.qkv, x).split((q_width, kv_width, kv_width), dim=-1)
        q = q.view(batch, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = k.view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, D)
        v = v.view(batch, n, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, N, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(cache, StaticKVCache):
            y = cache.attend(self.layer_index, q, k, v, backend=self.backend)  # (B, H, N, D)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_index, k, v)  # (B, Hkv, cached + N, D)
            y = ops.attention(
                q,
                k,
                v,
                causal=True,
                dropout_p=self.dropout if self.training else 0.0,
                backend=self.backend,
            )  # (B, H, N, D)
        y = y.transpose(1, 2).reshape(batch, n, q_width)  # (B, N, H*D)
        return self.out_dropout(project(self.out, y))
