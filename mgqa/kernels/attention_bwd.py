"""Triton backward kernels for grouped-query attention.

- ``_attn_bwd_delta``: delta_i = sum_d O_id * dO_id (float32), once per query row; only before the
  atomic-dQ kernel (the dQ kernel computes delta itself).
- ``_attn_bwd_dkdv``: one program owns BLOCK_N keys of one KV head and loops over every query
  head of its group and every query block, so dK/dV are summed over the group in registers and
  written once, straight into (B, Hkv, Nk, D).
- ``_attn_bwd_dq``: one program owns BLOCK_M query rows of one query head and loops over keys.
  Deterministic (no atomics), at the price of recomputing QK^T and dO V^T: 7 matmuls in all. It
  runs before the dK/dV kernel and writes its rows' delta for it.
- ``_attn_bwd_dkdv_dq``: the dK/dV kernel with ATOMIC_DQ, which also adds dS K into an fp32
  (B, H, Nq, D) buffer with atomics: 5 matmuls, but dQ's summation order varies run to run.

The softmax statistics come from the forward: ``lse`` is log2-sum-exp of the scaled scores
(log2 units), +inf for rows that see no key.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgqa.kernels.attention_common import (
    _key_block_program, _key_range, _kv_tiles, _load_kv_tile, _query_block_program,
)
from mgqa.kernels.attention_fwd import INTERPRET, prune_by_tile_bytes


def _gpu_configs(pairs) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs
    ]


def _configs(gpu_configs: list[triton.Config]) -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return list(gpu_configs)


# dK/dV: a key tile (BLOCK_N) stays resident; query tiles (BLOCK_M) stream past it. Ordered by the
# H100 timings of bench/attention_configs.py: 64x64 with 4 warps (several programs per SM) leads.
DKDV_GPU_CONFIGS = _gpu_configs([
    (64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 4, 3), (32, 64, 4, 2)
])
DKDV_DQ_GPU_CONFIGS = _gpu_configs([(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2), (64, 128, 8, 3)])
# dQ: a wide query tile stays resident; key tiles stream past it (same ordering as above).
DQ_GPU_CONFIGS = _gpu_configs([
    (128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2), (128, 32, 4, 3), (64, 32, 4, 2)
])
_DKDV_CONFIGS = _configs(DKDV_GPU_CONFIGS)
_DKDV_DQ_CONFIGS = _configs(DKDV_DQ_GPU_CONFIGS)
_DQ_CONFIGS = _configs(DQ_GPU_CONFIGS)


@triton.jit
def _attn_bwd_delta(
    Out, DO, Delta, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn, n_q, heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    batch = (pid_bh // heads).to(tl.int64)
    head = (pid_bh % heads).to(tl.int64)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + batch * stride_db + head * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head, lse_base, delta_base, stride_qn, stride_dn, start_m,
    offs_m0, offs_d, key_pos, n_q, offset, qk_scale, dq_base, dq_desc, stride_qqn,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
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
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t), k, input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_D), unscaled
        if USE_TMA:
            # One bulk reduce-add of the whole tile by the copy engine (rows past n_q are clipped),
            # instead of BLOCK_M * D scalar atomics.
            dq_desc.atomic_add([head, start_m, 0], dq.reshape(1, offs_m0.shape[0], offs_d.shape[0]))
        else:
            # Relaxed: plain reductions in L2, no ordering needed until the kernel ends.
            tl.atomic_add(dq_base + offs_m[:, None] * stride_qqn + offs_d[None, :], dq,
                          mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_gs, stride_gb, stride_gh, stride_gn,  # dK and dV share one contiguous layout
    stride_qqb, stride_qqh, stride_qqn,  # the fp32 dQ accumulator (ATOMIC_DQ only)
    n_q, n_k, kv_heads, qk_scale, sm_scale,
    N_BUCKET,
    SPLITS,  # the group is split over this many programs, each writing its own fp32 partial
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,  # one query loop per head (causal mask on every block)
    FLATTEN: tl.constexpr = False,  # flatten the head loop with that query loop (needs ONE_LOOP)
    SECTION_PROGRAMS=1, SECTION_CHUNKS=1,  # launch order (attention_common._key_block_program)
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
        if ATOMIC_DQ:
            dq_desc = tl.make_tensor_descriptor(DQ_ACC + batch.to(tl.int64) * stride_qqb,
                                                shape=[heads, n_q, HEAD_DIM], strides=[stride_qqh, stride_qqn, 1],
                                                block_shape=[1, BLOCK_M, BLOCK_D])
        else:
            dq_desc = DQ_ACC
    else:
        q_desc = Q
        do_desc = DO
        dq_desc = DQ_ACC
    per_split = GROUP // SPLITS
    for g in tl.range(split * per_split, (split + 1) * per_split, flatten=FLATTEN):
        head32 = kv_head * GROUP + g
        head = head32.to(tl.int64)
        bh = batch.to(tl.int64) * (kv_heads * GROUP) + head
        q_base = Q + batch.to(tl.int64) * stride_qb + head * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_db + head * stride_dh
        lse_base = Lse + bh * n_q
        delta_base = Delta + bh * n_q
        dq_base = DQ_ACC + batch.to(tl.int64) * stride_qqb + head * stride_qqh
        if ONE_LOOP:
            for start_m in range(lo, n_q, BLOCK_M):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                    stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale, dq_base, dq_desc, stride_qqn,
                    HEAD_DIM, CAUSAL, INPUT_PRECISION, USE_TMA, ATOMIC_DQ,
                )
        else:
            for start_m in range(lo, mid, BLOCK_M):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                    stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale, dq_base, dq_desc, stride_qqn,
                    HEAD_DIM, True, INPUT_PRECISION, USE_TMA, ATOMIC_DQ,
                )
            if ATOMIC_DQ:
                # Start each key block at a different query block: programs of one group would
                # otherwise add into the same dQ rows at the same time and serialise in L2.
                count = tl.cdiv(n_q - mid, BLOCK_M)
                for i in range(0, count):
                    start_m = mid + ((i + pid_n) % count) * BLOCK_M
                    dk, dv = _dkdv_step(
                        dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                        stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale, dq_base, dq_desc,
                        stride_qqn, HEAD_DIM, False, INPUT_PRECISION, USE_TMA, ATOMIC_DQ,
                    )
            else:
                for start_m in range(mid, n_q, BLOCK_M):
                    dk, dv = _dkdv_step(
                        dk, dv, k, v, q_base, do_base, q_desc, do_desc, head32, lse_base, delta_base, stride_qn,
                        stride_dn, start_m, offs_m0, offs_d, offs_n, n_q, offset, qk_scale, dq_base, dq_desc,
                        stride_qqn, HEAD_DIM, False, INPUT_PRECISION, USE_TMA, ATOMIC_DQ,
                    )

    out_off = (split.to(tl.int64) * stride_gs + batch.to(tl.int64) * stride_gb + kv_head.to(tl.int64) * stride_gh
               + offs_n[:, None] * stride_gn)
    tl.store(DK + out_off + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


_DKDV_KEY = ["HEAD_DIM", "CAUSAL", "GROUP", "N_BUCKET", "SPLITS", "USE_TMA", "ATOMIC_DQ", "ONE_LOOP", "FLATTEN"]
_attn_bwd_dkdv = triton.autotune(
    configs=_DKDV_CONFIGS, key=_DKDV_KEY, prune_configs_by={"early_config_prune": prune_by_tile_bytes},
)(_attn_bwd_dkdv_kernel)
# With dQ fused in, a (BLOCK_M, D) fp32 dQ tile joins the dK/dV accumulators in registers.
# reset_to_zero: the kernel adds into DQ_ACC, so each autotuning trial must start from zeros.
_attn_bwd_dkdv_dq = triton.autotune(
    configs=_DKDV_DQ_CONFIGS, key=_DKDV_KEY, prune_configs_by={"early_config_prune": prune_by_tile_bytes},
    reset_to_zero=["DQ_ACC"],
)(_attn_bwd_dkdv_kernel)


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


@triton.autotune(
    configs=_DQ_CONFIGS,
    key=["HEAD_DIM", "CAUSAL", "N_BUCKET", "GROUP", "USE_TMA"],
    prune_configs_by={"early_config_prune": prune_by_tile_bytes},
)
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
