"""Triton decode attention: a few query rows per sequence against a KV cache, GQA-packed and split-K.

``decode_attention(q, k_cache, v_cache, lengths, causal=..., scale=..., splits=...)``: q is
(B, H, Nq, D) with 1 <= Nq <= 8, the cache (B, Hkv, L, D), ``lengths`` (B,) the valid positions of
each sequence (the Nq queries are its last Nq positions). One program serves one KV head of one
sequence and every query row of its group: the H / Hkv query heads times Nq positions are the rows
of one tile, so each K/V tile is read from memory once for the whole group (FlashInfer's
"packed GQA"). The cache is split along L over ``splits`` programs per KV head (flash-decoding);
each split writes a float32 partial output and its log-sum-exp, and a second kernel combines them
in a fixed order, so results do not depend on scheduling. The split ranges are computed in the
kernel from each sequence's length, so one launch (or one captured CUDA graph) serves any lengths.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from mgqa.kernels.checks import INTERPRET
from mgqa.kernels.launch import cached_plan, device_props
from mgqa.kernels.plan import DECODE_MAX_QUERIES, DECODE_MAX_SPLITS, DecodePlan, plan_decode

__all__ = ["MAX_QUERIES", "compiled_decode_attention", "decode_attention", "decode_plan_for", "unsupported_reason"]

MAX_QUERIES = DECODE_MAX_QUERIES
MAX_SPLITS = DECODE_MAX_SPLITS
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> Optional[str]:
    """None if the decode kernel can run these inputs, else a short reason a user can act on."""
    for name, t in (("q", q), ("k_cache", k), ("v_cache", v)):
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims (expected 4: batch, heads, seq, head_dim)"
    if not q.is_cuda and not INTERPRET:
        return f"inputs are on {q.device.type}"
    if any(t.device != q.device for t in (k, v, lengths)):
        return f"q, k_cache, v_cache, lengths on different devices ({q.device}, {k.device}, {v.device}, {lengths.device})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not in (float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q {q.dtype}, k_cache {k.dtype}, v_cache {v.dtype}"
    batch, heads, n_q, head_dim = q.shape
    if not 1 <= n_q <= MAX_QUERIES:
        return f"{n_q} query rows per sequence (decode takes 1..{MAX_QUERIES})"
    if head_dim % 8 or not 16 <= head_dim <= 256:
        return f"head_dim {head_dim} (decode takes a multiple of 8 in 16..256)"
    if k.shape != v.shape:
        return f"k_cache {tuple(k.shape)} and v_cache {tuple(v.shape)} differ in shape"
    if k.shape[0] != batch or k.shape[3] != head_dim:
        return f"q {tuple(q.shape)} and k_cache {tuple(k.shape)} differ in batch or head_dim"
    if k.shape[1] == 0 or heads % k.shape[1]:
        return f"query heads ({heads}) not a multiple of KV heads ({k.shape[1]})"
    if tuple(lengths.shape) != (batch,) or lengths.dtype not in (torch.int32, torch.int64):
        return f"lengths must be an integer tensor of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}"
    for name, t in (("q", q), ("k_cache", k), ("v_cache", v)):
        if t.stride(-1) != 1:
            return f"{name} has a non-contiguous last dimension (strides {t.stride()})"
    return None


@triton.jit
def _decode_split(
    Q, K, V, Lengths, Out, PartOut, PartLse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    kv_heads, row_blocks, capacity, splits, qk_scale,
    GROUP: tl.constexpr, N_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ONE_SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_block = pid % row_blocks
    kv_head = (pid // row_blocks) % kv_heads
    batch = pid // (row_blocks * kv_heads)

    # Row r of the tile is query position r % N_Q of group member r // N_Q.
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * N_Q
    head = kv_head * GROUP + rows // N_Q  # (BLOCK_M,)
    qi = rows % N_Q
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + batch.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + qi[:, None] * stride_qn + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    length = tl.minimum(tl.load(Lengths + batch).to(tl.int32), capacity)
    # This split's keys: an equal share of the sequence, rounded to whole tiles.
    chunk = tl.cdiv(tl.cdiv(length, splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    # Bottom-right causal alignment: query qi sits at position length - N_Q + qi.
    q_pos = length - N_Q + qi  # (BLOCK_M,)

    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # (BLOCK_N,)
        col_ok = cols < hi
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        keep = col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= q_pos[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet keeps m = -inf; shift by 0 so that exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if ONE_SPLIT:
        o_ptrs = (Out + batch.to(tl.int64) * stride_ob + head[:, None].to(tl.int64) * stride_oh
                  + qi[:, None] * stride_on + offs_d[None, :])
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        # Partials are laid out (B, H, N_Q, splits, D) and (B, H, N_Q, splits), contiguous.
        part_row = ((batch * (kv_heads * GROUP) + head) * N_Q + qi).to(tl.int64) * splits + split  # (BLOCK_M,)
        tl.store(PartOut + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(PartLse + part_row, lse, mask=row_ok)


@triton.jit
def _decode_combine(
    PartOut, PartLse, Out, stride_ob, stride_oh, stride_on, heads, splits,
    N_Q: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # (batch * heads + head) * N_Q + qi
    qi = row % N_Q
    head = (row // N_Q) % heads
    batch = row // (N_Q * heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    d_ok = offs_d < HEAD_DIM
    base = row.to(tl.int64) * splits
    lse = tl.load(PartLse + base + offs_s, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key: weights 0, output 0
    w = tl.math.exp2(lse - m)
    parts = tl.load(PartOut + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + qi * stride_on + offs_d
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=d_ok)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    splits: Optional[int] = None,
    plan: Optional[DecodePlan] = None,
) -> torch.Tensor:
    """Attention of the last Nq positions of each sequence over its cached keys.

    q: (B, H, Nq, D), 1 <= Nq <= 8; k_cache, v_cache: (B, Hkv, L, D), H % Hkv == 0, fp16, bf16 or
    fp32 (fp32: exact IEEE dots, for tests), last dimension contiguous. lengths: (B,) int32/int64
    on q's device, positions valid per sequence, Nq <= lengths[b] <= L (larger values are clamped to
    L; they are not checked, which would cost a device sync). ``causal``: query i of sequence b sits
    at position lengths[b] - Nq + i and sees keys up to it; otherwise every query sees all
    lengths[b] keys. ``splits`` overrides the plan's split count; ``plan`` (``plan.plan_decode``)
    replaces the plan. Returns (B, H, Nq, D) in q's dtype. No host synchronisation: the launch can be
    captured in a CUDA graph.
    """
    reason = unsupported_reason(q, k_cache, v_cache, lengths)
    if reason is not None:
        raise ValueError(f"triton decode attention: {reason}")
    if splits is not None and not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"triton decode attention: splits must be in 1..{MAX_SPLITS}, got {splits}")
    return _run(q, k_cache, v_cache, lengths, causal, scale, plan or decode_plan_for(q, k_cache, splits))


def decode_plan_for(q: torch.Tensor, k_cache: torch.Tensor, splits: Optional[int] = None) -> DecodePlan:
    """The plan a decode call on these inputs carries out."""
    batch, heads, n_q, head_dim = q.shape
    key = ("decode", batch, heads, k_cache.shape[1], n_q, k_cache.shape[2], head_dim, q.dtype, q.device, splits)
    return cached_plan(key, lambda: plan_decode(batch, heads, k_cache.shape[1], n_q, k_cache.shape[2], head_dim,
                                                str(q.dtype).removeprefix("torch."), device_props(q.device), splits))


def _run(q, k_cache, v_cache, lengths, causal: bool, scale: Optional[float], plan: DecodePlan) -> torch.Tensor:
    batch, heads, n_q, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    splits, tiles = plan.splits, plan.tiles
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    if splits > 1:
        part_out = torch.empty((batch, heads, n_q, splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, heads, n_q, splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split[(batch * kv_heads * plan.row_blocks, splits)](
        q, k_cache, v_cache, lengths, out, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_heads, plan.row_blocks, capacity, splits, scale * LOG2E,
        GROUP=heads // kv_heads, N_Q=n_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, CAUSAL=causal, ONE_SPLIT=splits == 1,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if splits > 1:
        _decode_combine[(batch * heads * n_q,)](
            part_out, part_lse, out, out.stride(0), out.stride(1), out.stride(2), heads, splits,
            N_Q=n_q, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            num_warps=4 if block_d >= 128 else 2,
        )
    return out


@torch.library.custom_op("mgqa::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, causal: bool,
               scale: float, splits: int) -> torch.Tensor:
    return _run(q, k_cache, v_cache, lengths, causal, scale, decode_plan_for(q, k_cache, splits or None))


@_decode_op.register_fake
def _(q, k_cache, v_cache, lengths, causal, scale, splits):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def compiled_decode_attention(q, k_cache, v_cache, lengths, *, causal=True, scale=None, splits=None) -> torch.Tensor:
    """``decode_attention`` for inputs already checked (``unsupported_reason`` is None), as the
    ``mgqa::decode_attention`` custom op when ``torch.compile`` traces it (eager calls skip the op's
    dispatch cost)."""
    if torch.compiler.is_compiling():
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _decode_op(q, k_cache, v_cache, lengths, causal, scale, splits or 0)
    return _run(q, k_cache, v_cache, lengths, causal, scale, decode_plan_for(q, k_cache, splits))
