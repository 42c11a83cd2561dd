"""Attention through torch.nn.functional.scaled_dot_product_attention, GQA without copying K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mgqa.ops.reference import cache_mask, causal_mask


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q: (B, H, Nq, D), k and v: (B, Hkv, Nk, D) -> (B, H, Nq, D).

    ``enable_gqa`` lets PyTorch map query head h to KV head h // (H / Hkv) itself.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    attn_mask = None
    is_causal = False
    if causal:
        if n_q == n_k:
            is_causal = True
        elif n_q > 1:
            # SDPA's is_causal aligns top-left; the cache case needs bottom-right.
            attn_mask = causal_mask(n_q, n_k, q.device)  # (Nq, Nk)
        # n_q == 1: the only query is the newest position and sees every key.
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def sdpa_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """q: (B, H, Nq, D) against the first ``lengths[b]`` rows of k_cache, v_cache (B, Hkv, L, D).

    The per-sequence lengths become a boolean mask over the whole cache.
    """
    mask = cache_mask(lengths, q.shape[2], k_cache.shape[2], causal=causal)  # (B, 1, Nq, L)
    return F.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[1]
    )
