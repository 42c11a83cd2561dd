"""Helpers shared by the plain-Triton attention kernels: which query block and heads a program owns,
how it reads K/V tiles, which key blocks need masks (``@triton.jit``, inlined into the kernels), and
the autotuned wrapper of a kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mgqa.kernels import plan as _plan


def autotuned(kernel, kind: str, key: list[str]):
    """``kernel`` under Triton's autotuner, timing the plan's candidate tiles (``plan.tl_configs``)
    that fit the call's head_dim and dtype."""
    table = {"fwd": _plan.TL_FWD_CONFIGS, "dq": _plan.TL_DQ_CONFIGS, "dkdv": _plan.TL_DKDV_CONFIGS}[kind]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r)
               for bm, bn, w, s, r in table]

    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        elem = named_args["Q"].element_size()
        kept = [c for c in configs if _plan.tile_fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages,
                                                      c.maxnreg, block_d, elem)]
        return kept or configs[-1:]

    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


@triton.jit
def _section_chunks(programs_per_chunk, SECTION_PROGRAMS, SECTION_CHUNKS):
    """How many chunks (a chunk: every program of one KV head's group, or of one group split) one
    section of the launch order spans: enough for SECTION_PROGRAMS programs, at most SECTION_CHUNKS
    (the host's L2 budget; 1 keeps the plain chunk-by-chunk order)."""
    return tl.maximum(tl.minimum(tl.cdiv(SECTION_PROGRAMS, programs_per_chunk), SECTION_CHUNKS), 1)


@triton.jit
def _query_block_program(
    n_q, heads, GROUP, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, SECTION_PROGRAMS, SECTION_CHUNKS,
):
    """This program's (batch, kv_head, member, start_m) on a 1-D grid of query blocks; its query
    head is ``kv_head * GROUP + member`` (so it reads KV head ``head // GROUP``).

    The grid is cut into sections of a few (batch, kv_head) chunks; within a section the order is
    (query block, chunk, group member), the member fastest: programs running at once share one KV
    head's K/V tiles, which then come from L2. Causal query blocks run last-first (the last see the
    most keys), across the whole section, so the launch ends on short programs instead of leaving a
    few long ones running alone. With one chunk per section this is the plain (chunk, query block,
    member) order.
    """
    return _query_block_at(tl.program_id(0), tl.num_programs(0), n_q, heads, GROUP, BLOCK_M, CAUSAL,
                           SECTION_PROGRAMS, SECTION_CHUNKS)


@triton.jit
def _query_block_at(
    pid, n_programs, n_q, heads, GROUP, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, SECTION_PROGRAMS,
    SECTION_CHUNKS,
):
    """``_query_block_program`` for position ``pid`` of an order of ``n_programs`` query blocks (a
    persistent program walks several)."""
    num_m = tl.cdiv(n_q, BLOCK_M)
    per_kv = GROUP * num_m
    n_chunks = n_programs // per_kv
    section = _section_chunks(per_kv, SECTION_PROGRAMS, SECTION_CHUNKS)
    first = pid // (section * per_kv) * section
    within = pid - first * per_kv
    per_block = tl.minimum(section, n_chunks - first) * GROUP
    pid_m = within // per_block
    rest = within % per_block
    if CAUSAL:
        pid_m = num_m - 1 - pid_m
    kv_heads = heads // GROUP
    pid_bkv = first + rest // GROUP
    batch = pid_bkv // kv_heads
    kv_head = pid_bkv % kv_heads
    return batch, kv_head, rest % GROUP, pid_m * BLOCK_M


@triton.jit
def _key_block_program(n_k, SPLITS, BLOCK_N: tl.constexpr, SECTION_PROGRAMS, SECTION_CHUNKS):
    """This dK/dV program's (pid_n, split, pid_bkv): its key block, which part of the query group
    it sums over, and its (batch, kv_head) as ``batch * kv_heads + kv_head``.

    Sections as in ``_query_block_program``, a chunk being one group split's key blocks, ordered
    (key block, chunk) within a section: the programs running at once share a few groups' Q/dO in
    L2, and under a causal mask the first key blocks, which see the most queries, start first
    across the whole section. With one chunk per section: (chunk, key block).
    """
    num_n = tl.cdiv(n_k, BLOCK_N)
    chunk, pid_n = _key_block_at(tl.program_id(0), num_n, tl.num_programs(0) // num_n, SECTION_PROGRAMS,
                                 SECTION_CHUNKS)
    return pid_n, chunk % SPLITS, chunk // SPLITS


@triton.jit
def _key_block_at(pid, num_n, n_chunks, SECTION_PROGRAMS, SECTION_CHUNKS):
    """(chunk, key block) at position ``pid`` of the key-block launch order of ``n_chunks`` chunks of
    ``num_n`` key blocks (``_key_block_program``; the Gluon dK/dV kernel's order too)."""
    section = _section_chunks(num_n, SECTION_PROGRAMS, SECTION_CHUNKS)
    first = pid // (section * num_n) * section
    within = pid - first * num_n
    count = tl.minimum(section, n_chunks - first)
    return first + within % count, within // count


@triton.jit
def _kv_tiles(
    k_base, v_base, n_k, stride_kn, stride_vn,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr,
):
    """What the key loop reads K and V (n_k, HEAD_DIM) tiles through: tensor descriptors (TMA) when
    USE_TMA, else the base pointers themselves."""
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[n_k, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[n_k, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base
    return k_desc, v_desc


@triton.jit
def _load_kv_tile(
    k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, start_n, cols, offs_d, n_k,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr,
):
    """The K and V tiles (BLOCK_N, BLOCK_D) of keys ``cols`` (= start_n + arange(BLOCK_N)); zeros
    past n_k and past HEAD_DIM."""
    if USE_TMA:
        # The copy engine zero-fills rows past n_k, so no load mask is needed.
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
    else:
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            kv_mask = (cols[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    return k, v


@triton.jit
def _key_range(start_m, n_q, n_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(hi_full, hi): keys [0, hi_full) are visible to every row of the query block, so need no
    mask; keys [hi_full, hi) (the diagonal and the ragged end) are masked; keys past hi are never
    visible. Causal is aligned bottom-right: query i sits at position i + (n_k - n_q)."""
    offset = n_k - n_q
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), n_k)
        hi_full = tl.minimum(tl.maximum(start_m + offset + 1, 0), n_k) // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        hi_full = n_k // BLOCK_N * BLOCK_N
    return hi_full, hi
