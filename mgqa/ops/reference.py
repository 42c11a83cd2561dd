"""Plain-PyTorch attention in float32 (or float64): the oracle every other backend is tested against."""

from __future__ import annotations

import math

import torch


def causal_mask(n_q: int, n_k: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask (Nq, Nk), True where query i may attend key j.

    Aligned to the bottom-right: the last query sees every key. With Nq < Nk (a prefill or decode
    step after a KV cache) query i sits at absolute position ``Nk - Nq + i``.
    """
    offset = n_k - n_q
    rows = torch.arange(n_q, device=device).unsqueeze(1)
    cols = torch.arange(n_k, device=device).unsqueeze(0)
    return cols <= rows + offset  # (Nq, Nk)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    dropout_p: float = 0.0,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with query head h reading KV head h // (H / Hkv).

    q: (B, H, Nq, D), k and v: (B, Hkv, Nk, D). Computes in ``upcast`` precision (float32, or
    float64 for tests; float64 inputs always in float64) and returns q's dtype. Query rows that can see no key (causal with
    Nq > Nk) output zeros.
    """
    if not q.dtype == k.dtype == v.dtype:  # as SDPA: no silent promotion of one operand
        raise ValueError(
            f"query, key and value must have the same dtype, got query {q.dtype}, key {k.dtype}, value {v.dtype}"
        )
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if q.dtype == torch.float64:
        upcast = torch.float64  # never compute below the inputs' precision
    qf = q.to(upcast).reshape(batch, kv_heads, group, n_q, head_dim)  # (B, Hkv, G, Nq, D)
    kf = k.to(upcast).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    vf = v.to(upcast).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hkv, G, Nq, Nk)
    if causal:
        mask = causal_mask(n_q, n_k, q.device)  # (Nq, Nk)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if causal and n_q > n_k:
        # Rows that see no key are all -inf: zero them by the mask, never by value, so that a NaN in
        # q, k or v still reaches the output as it does with SDPA.
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, vf)  # (B, Hkv, G, Nq, D)
    return out.reshape(batch, heads, n_q, head_dim).to(q.dtype)


def cache_mask(lengths: torch.Tensor, n_q: int, capacity: int, *, causal: bool) -> torch.Tensor:
    """Boolean mask (B, 1, Nq, L), True where query i of sequence b may attend cache position j.

    Sequence b holds ``lengths[b]`` valid positions; its Nq queries are the last Nq of them, so
    with ``causal`` query i sees positions up to ``lengths[b] - Nq + i``, and otherwise all of them.
    """
    cols = torch.arange(capacity, device=lengths.device)  # (L,)
    lengths = lengths.to(torch.long).clamp(max=capacity)[:, None, None, None]  # (B, 1, 1, 1)
    if causal:
        last = lengths - n_q + torch.arange(n_q, device=lengths.device)[:, None]  # (B, 1, Nq, 1)
        return cols <= last
    return (cols < lengths).expand(-1, 1, n_q, capacity)


def reference_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    upcast: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention of the last Nq positions of each sequence over its first ``lengths[b]`` cache rows.

    q: (B, H, Nq, D); k_cache, v_cache: (B, Hkv, L, D); lengths: (B,). The oracle of the decode
    kernel, computed like ``reference_attention``. Returns q's dtype.
    """
    batch, heads, n_q, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if q.dtype == torch.float64:
        upcast = torch.float64
    qf = q.to(upcast).reshape(batch, kv_heads, group, n_q, head_dim)  # (B, Hkv, G, Nq, D)
    kf = k_cache.to(upcast).unsqueeze(2)  # (B, Hkv, 1, L, D)
    vf = v_cache.to(upcast).unsqueeze(2)  # (B, Hkv, 1, L, D)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, Hkv, G, Nq, L)
    mask = cache_mask(lengths, n_q, capacity, causal=causal).unsqueeze(1)  # (B, 1, 1, Nq, L)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    # A row that sees no position (length 0) is zeroed by the mask, never by value, so that a NaN in
    # q or the cache still reaches the output.
    probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    out = torch.matmul(probs, vf)  # (B, Hkv, G, Nq, D)
    return out.reshape(batch, heads, n_q, head_dim).to(q.dtype)
