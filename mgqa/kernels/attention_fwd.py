"""Triton forward kernel for grouped-query attention (FlashAttention-2 style online softmax).

One program computes BLOCK_M query rows of one query head. Query head ``h`` reads KV head
``h // GROUP`` by index; programs are ordered so that the GROUP query heads sharing a KV head run
side by side and hit the same K/V tiles in L2.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from mgqa.kernels.attention_common import _key_range, _kv_tiles, _load_kv_tile, _query_block_program

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# MGQA_TRITON_AUTOTUNE=0 takes the first config that fits instead of timing them all (quick test runs).
AUTOTUNE = os.environ.get("MGQA_TRITON_AUTOTUNE", "1") != "0"


# Launch configurations on a GPU: the fastest per shape in bench/attention_configs.py on an H100
# (results/attention_configs_h100.json), then small tiles for fp32 and head_dim 256. Without
# autotuning the first that fits is taken. (BLOCK_M, BLOCK_N, warps, stages, register cap)
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r)
    for bm, bn, w, s, r in [
        (128, 64, 8, 3, None),   # non-causal
        (128, 64, 4, 2, None),   # causal N=4k: one warpgroup per program, two programs per SM
        (128, 64, 8, 5, None),   # causal N=8k
        (128, 128, 8, 2, 128),   # head_dim 64: registers capped so two programs share an SM
        (64, 64, 4, 3, None),
        (64, 32, 4, 2, None),
    ]
]


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return list(GPU_CONFIGS)


def prune_by_tile_bytes(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit (shared memory / registers) for this head_dim and dtype.

    The budget is a rough bound on the bytes of the Q tile plus the pipelined K/V tiles; configs
    above it either fail to compile or spill, and each costs an autotuning compile.
    """
    head_dim = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    elem = named_args["Q"].element_size()
    kept = []
    for cfg in configs:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        tile_bytes = (bm + 2 * bn * max(cfg.num_stages, 1)) * head_dim * elem
        if elem == 4 and bm * bn > 64 * 64:
            continue  # fp32 operands: keep the register tiles small
        if head_dim >= 256 and bm * bn > 64 * 64:
            continue
        if cfg.maxnreg is not None and bm * bn * head_dim > 128 * 128 * 64:
            continue  # a register cap sized for smaller tiles would spill
        if tile_bytes <= 200 * 1024:
            kept.append(cfg)
    if not kept:
        return configs[-1:]
    return kept if AUTOTUNE else kept[:1]


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n, offs_d, q_pos, n_k,
    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, SOFTMAX: tl.constexpr,
):
    cols = start_n + offs_n  # (BLOCK_N,)
    k, v = _load_kv_tile(k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, cols, offs_d, n_k,
                         HEAD_DIM, BLOCK_D, MASKED, USE_TMA)
    if SOFTMAX == 0:
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
    else:
        # Raw scores; the (positive) scale goes into the exp2 argument as one FMA per element.
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keep = cols[None, :] < n_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= q_pos[:, None])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if SOFTMAX == 1:
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        else:
            # Lazy rescaling: keep a stale row max until some row's max grows by more than 8
            # (log2 units). Until then p <= 2^8, harmless in fp32 and in the fp16/bf16 P operand,
            # and the block skips the (BLOCK_M, D) multiply of the accumulator.
            if tl.max(m_new - m_i, 0) > 8.0:
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
        p = tl.math.exp2(qk * qk_scale - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_i


@triton.autotune(
    configs=_fwd_configs(),
    key=["HEAD_DIM", "CAUSAL", "N_BUCKET", "GROUP", "USE_TMA", "SOFTMAX"],
    prune_configs_by={"early_config_prune": prune_by_tile_bytes},
)
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
    SOFTMAX: tl.constexpr,  # 0: scale then max; 1: scale folded into exp2's FMA; 2: 1 + lazy rescaling
    SECTION_PROGRAMS=1, SECTION_CHUNKS=1,  # launch order (attention_common._query_block_program)
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
            n_k, qk_scale, HEAD_DIM, BLOCK_D, False, CAUSAL, INPUT_PRECISION, USE_TMA, SOFTMAX,
        )
    # The diagonal and the ragged end of the keys: masked.
    for start_n in range(hi_full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, offs_n, offs_d, q_pos,
            n_k, qk_scale, HEAD_DIM, BLOCK_D, True, CAUSAL, INPUT_PRECISION, USE_TMA, SOFTMAX,
        )

    # Rows that see no key (causal with n_q > n_k) output 0 and store lse = +inf, so the
    # backward's exp2(s - lse) is 0 for them.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)
