"""Plain-Triton dQ kernel of the attention backward.

One program owns BLOCK_M query rows of one query head and loops over keys, recomputing QK^T and
dO V^T (deterministic, no atomics). It runs before the dK/dV kernel and writes its rows' delta
(sum_d O dO) for it. ``lse`` comes from the forward: log2-sum-exp of the scaled scores, +inf for
rows that see no key.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgqa.kernels.tl_common import _key_range, _kv_tiles, _load_kv_tile, _query_block_program, autotuned


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n0, offs_d, q_pos,
    n_k, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    cols = start_n + offs_n0
    k, v = _load_kv_tile(k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, cols, offs_d, n_k,
                         HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        keep = cols[None, :] < n_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= q_pos[:, None])
        p = tl.where(keep, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Out, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_ob, stride_oh, stride_on,
    stride_gb, stride_gh, stride_gn,
    n_q, n_k, heads, qk_scale, sm_scale,
    N_BUCKET,
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    SECTION_PROGRAMS=1, SECTION_CHUNKS=1,
):
    # Same 1-D order as the forward: sections of (query block, batch and kv_head, group member).
    batch, kv_head, member, start_m = _query_block_program(n_q, heads, GROUP, BLOCK_M, CAUSAL, SECTION_PROGRAMS,
                                                           SECTION_CHUNKS)
    batch, kv_head = batch.to(tl.int64), kv_head.to(tl.int64)
    head = kv_head * GROUP + member
    pid_bh = batch * heads + head
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    row_ok = offs_m < n_q
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + batch * stride_db + head * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=mask, other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * n_q + offs_m, mask=row_ok, other=float("inf"))
    o = tl.load(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0)
    # delta_i = sum_d O_id dO_id, for this program's rows: used below and stored for the dK/dV kernel.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * n_q + offs_m, delta, mask=row_ok)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    k_desc, v_desc = _kv_tiles(k_base, v_base, n_k, stride_kn, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)

    q_pos = offs_m + (n_k - n_q)
    hi_full, hi = _key_range(start_m, n_q, n_k, BLOCK_M, BLOCK_N, CAUSAL)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n0,
                      offs_d, q_pos, n_k, qk_scale, HEAD_DIM, BLOCK_D, False, CAUSAL, INPUT_PRECISION, USE_TMA)
    for start_n in range(hi_full, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n0,
                      offs_d, q_pos, n_k, qk_scale, HEAD_DIM, BLOCK_D, True, CAUSAL, INPUT_PRECISION, USE_TMA)

    tl.store(DQ + batch * stride_gb + head * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


_attn_bwd_dq_tuned = autotuned(_attn_bwd_dq, "dq", key=["HEAD_DIM", "CAUSAL", "N_BUCKET", "GROUP", "USE_TMA"])
