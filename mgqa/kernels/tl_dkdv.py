"""Plain-Triton dK/dV kernel of the attention backward.

One program owns BLOCK_N keys of one KV head and loops over the query heads of its group (or of its
share of the group: ``SPLITS`` programs per key block, each writing a float32 partial that the
launcher sums in a fixed order) and over their query blocks, so dK/dV are summed over the group in
registers and written once, straight into (B, Hkv, Nk, D). ``delta`` comes from the dQ kernel, which
runs first; ``lse`` from the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgqa.kernels.tl_common import _key_block_program, autotuned


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head, lse_base, delta_base, stride_qn, stride_dn, start_m,
    offs_m0, offs_d, key_pos, n_q, offset, qk_scale,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    offs_m = start_m + offs_m0
    row_ok = offs_m < n_q
    if USE_TMA:
        q = q_desc.load([head, start_m, 0]).reshape(offs_m0.shape[0], offs_d.shape[0])
        do = do_desc.load([head, start_m, 0]).reshape(offs_m0.shape[0], offs_d.shape[0])
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=mask, other=0.0)
    # Rows past n_q get lse = +inf, hence p = 0: no explicit row mask needed below.
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
    p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
    if MASKED:
        p_t = tl.where(key_pos[:, None] <= offs_m[None, :] + offset, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_gs, stride_gb, stride_gh, stride_gn,  # dK and dV share one contiguous layout
    n_q, n_k, kv_heads, qk_scale, sm_scale,
    N_BUCKET,
    SPLITS,  # the group is split over this many programs, each writing its own fp32 partial
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,  # one query loop per head (causal mask on every block)
    FLATTEN: tl.constexpr = False,  # flatten the head loop with that query loop (needs ONE_LOOP)
    SECTION_PROGRAMS=1, SECTION_CHUNKS=1,  # launch order (tl_common._key_block_program)
):
    pid_n, split, pid_bkv = _key_block_program(n_k, SPLITS, BLOCK_N, SECTION_PROGRAMS, SECTION_CHUNKS)
    batch = pid_bkv // kv_heads
    kv_head = pid_bkv % kv_heads
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    kv_mask = (offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    offset = n_k - n_q
    if CAUSAL:
        # Key j is seen by queries i >= j - offset; pairs in [lo, mid) straddle the diagonal.
        lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.maximum(start_n + BLOCK_N - offset, 0), n_q)
        mid = tl.maximum(tl.cdiv(mid, BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        mid = 0

    heads = kv_heads * GROUP
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(Q + batch.to(tl.int64) * stride_qb, shape=[heads, n_q, HEAD_DIM],
                                           strides=[stride_qh, stride_qn, 1], block_shape=[1, BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DO + batch.to(tl.int64) * stride_db, shape=[heads, n_q, HEAD_DIM],
                                            strides=[stride_dh, stride_dn, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    else:
        q_desc = Q
        do_desc = DO
    per_split = GROUP // SPLITS
    for g in tl.range(split * per_split, (split + 1) * per_split, flatten=FLATTEN):
        head32 = kv_head * GROUP + g
        head = head32.to(tl.int64)
        bh = batch.to(tl.int64) * (kv_heads * GROUP) + head
        q_base = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_db + head * stride_dh
        lse_base = Lse + bh * n_q
        delta_base = Delta + bh * n_q
        if ONE_LOOP:
            for start_m in range(lo, n_q, BLOCK_M):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                    stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale,
                    HEAD_DIM, CAUSAL, INPUT_PRECISION, USE_TMA,
                )
        else:
            for start_m in range(lo, mid, BLOCK_M):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                    stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale,
                    HEAD_DIM, True, INPUT_PRECISION, USE_TMA,
                )
            for start_m in range(mid, n_q, BLOCK_M):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                    stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale,
                    HEAD_DIM, False, INPUT_PRECISION, USE_TMA,
                )

    out_off = (split.to(tl.int64) * stride_gs + batch.to(tl.int64) * stride_gb + kv_head.to(tl.int64) * stride_gh
               + offs_n[:, None] * stride_gn)
    tl.store(DK + out_off + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


_attn_bwd_dkdv_tuned = autotuned(_attn_bwd_dkdv, "dkdv", key=["HEAD_DIM", "CAUSAL", "GROUP", "N_BUCKET", "SPLITS",
                                                              "USE_TMA", "ONE_LOOP", "FLATTEN"])
