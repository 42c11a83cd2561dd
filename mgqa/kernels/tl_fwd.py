"""Plain-Triton forward kernel for grouped-query attention (FlashAttention-2 style online softmax).

One program computes BLOCK_M query rows of one query head. Query head ``h`` reads KV head
``h // GROUP`` by index; programs are ordered so that the GROUP query heads sharing a KV head run
side by side and hit the same K/V tiles in L2. Runs on any CUDA GPU and in Triton's interpreter;
``plan.py`` says where it runs instead of the Gluon forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgqa.kernels.tl_common import _key_range, _kv_tiles, _load_kv_tile, _query_block_program, autotuned


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n, offs_d, q_pos, n_k,
    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    cols = start_n + offs_n  # (BLOCK_N,)
    k, v = _load_kv_tile(k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, cols, offs_d, n_k,
                         HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        keep = cols[None, :] < n_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= q_pos[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    # m_i starts at a finite -1e30, so a row with every key masked gets p = 0 instead of NaN.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n_q, n_k, heads, qk_scale,
    N_BUCKET,  # autotune key only: next power of two of n_k, capped
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    SECTION_PROGRAMS=1, SECTION_CHUNKS=1,  # launch order (tl_common._query_block_program)
):
    batch, kv_head, member, start_m = _query_block_program(n_q, heads, GROUP, BLOCK_M, CAUSAL, SECTION_PROGRAMS,
                                                           SECTION_CHUNKS)
    head = kv_head * GROUP + member
    pid_bh = batch * heads + head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q_mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)
    k_desc, v_desc = _kv_tiles(k_base, v_base, n_k, stride_kn, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)

    # Bottom-right causal alignment: query i sits at absolute position i + (n_k - n_q).
    q_pos = offs_m + (n_k - n_q)
    hi_full, hi = _key_range(start_m, n_q, n_k, BLOCK_M, BLOCK_N, CAUSAL)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Key blocks every row of this block may fully see: no masks.
    for start_n in range(0, hi_full, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n, offs_d, q_pos,
            n_k, qk_scale, HEAD_DIM, BLOCK_D, False, CAUSAL, INPUT_PRECISION, USE_TMA,
        )
    # The diagonal and the ragged end of the keys: masked.
    for start_n in range(hi_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n, offs_d, q_pos,
            n_k, qk_scale, HEAD_DIM, BLOCK_D, True, CAUSAL, INPUT_PRECISION, USE_TMA,
        )

    # Rows that see no key (causal with n_q > n_k) output 0 and store lse = +inf, so the
    # backward's exp2(s - lse) is 0 for them.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)


# Without autotuning the launcher passes the plan's tiles; with it, the autotuner times the plan's
# candidates (plan.tl_configs) on a shape's first call.
_attn_fwd_tuned = autotuned(_attn_fwd, "fwd", key=["HEAD_DIM", "CAUSAL", "N_BUCKET", "GROUP", "USE_TMA"])
