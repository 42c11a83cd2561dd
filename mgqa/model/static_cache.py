"""A KV cache allocated once, with a length per sequence: what fast batched generation decodes against."""

from __future__ import annotations

import torch

from mgqa import ops


class StaticKVCache:
    """Keys and values (B, Hkv, capacity, D) for every layer, and ``lengths`` (B,) on the device.

    Sequence b holds ``lengths[b]`` valid positions, so prompts of different lengths share one
    batch without padding the decode steps: each step writes a sequence's new keys at its own
    length and attention reads only its valid positions. Nothing here reads a length back to the
    host, so a decode step through this cache can be captured in a CUDA graph (the buffers and the
    ``lengths`` tensor never move). Writes past ``capacity`` are clamped to its last position; the
    caller keeps lengths below it.
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
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1, got {capacity}")
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)  # (B,)
        self.capacity = capacity
        self.prefill = False  # set while the first tokens of every sequence go in (an empty cache)

    def positions(self, n: int) -> torch.Tensor:
        """Absolute positions (B, n) of the next n tokens of every sequence."""
        steps = torch.arange(n, device=self.lengths.device, dtype=torch.long)
        return self.lengths.long()[:, None] + steps  # (B, n)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str
    ) -> torch.Tensor:
        """Store k, v (B, Hkv, n, D) after each sequence's cached positions; return the causal
        attention of q (B, H, n, D) over everything cached, (B, H, n, D)."""
        n = k.shape[2]
        if self.prefill:
            # An empty cache: the keys are exactly these, so the training kernels' causal attention
            # serves; right-padded rows see only their own earlier tokens.
            self.keys[layer][:, :, :n] = k
            self.values[layer][:, :, :n] = v
            return ops.attention(q, k, v, causal=True, backend=backend)  # (B, H, n, D)
        positions = self.positions(n).clamp_(max=self.capacity - 1)  # (B, n)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1)
        # An indexed assignment (index_put_), which torch.compile keeps in place; the indexed
        # view is (B, n, Hkv, D).
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)
        lengths = self.lengths + n  # (B,)
        return ops.decode_attention(q, self.keys[layer], self.values[layer], lengths, causal=True, backend=backend)

    def advance(self, n: int) -> None:
        """Every sequence grew by n positions (in place: a captured step keeps the same tensor)."""
        self.lengths += n

