"""Warp-specialised, persistent attention forward for Hopper (sm_90), written in Gluon, Triton's
lower-level dialect.

It computes what ``tl_fwd._attn_fwd`` does: for q (B, H, Nq, D) and k, v (B, Hkv, Nk, D) with any
row strides, query head h reading KV head h // GROUP, out (B, H, Nq, D) contiguous and lse (B, H, Nq)
in log2 units, +inf for rows that see no key (causal is aligned bottom-right). Lengths are arbitrary:
the copy engine zero-fills rows past the end, and the last key block is masked.

Organisation (FlashAttention-3's, which plain ``tl`` code cannot express):

- one program per SM walks query tiles of ``2 * BLOCK_M`` rows: positions p, p + P, p + 2P, ... of
  the tl kernels' launch order (sections of a few (batch, KV head) chunks, causal tiles last-first),
  or with ``SCHEDULED`` the list the host made for it (``plan.forward_schedule``: each tile goes to
  the program that frees up first, as the hardware hands out one-tile programs);
- a one-warp *producer* issues every copy-engine (TMA) load: a tile's two Q blocks as soon as both
  consumers have issued their last Q Kᵀ of the tile before, then its K/V blocks through ``STAGES``
  shared-memory buffers, each refilled once both consumers have released it. One ring serves all
  of a program's tiles, so a tile's set-up overlaps the previous tile's last P·V and output store;
- two *consumer* warpgroups each own ``BLOCK_M`` of the tile's rows and share every K/V block. Each
  issues S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} back to back, waits for S_j only, and computes block
  j's softmax while the P·V matmul runs;
- registers move from the producer to the consumers (``setmaxnreg``, gluon_common).

Only for head_dim 128 in fp16/bf16 with a positive scale (``plan.py`` decides). Gluon has no CPU
interpreter: CPU CI compiles the kernel for sm_90 (``compile_check``) and the GPU suite checks it.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from mgqa.kernels.gluon_common import (
    CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS, buffer_barriers, key_blocks, query_block_at,
    register_operand_layout, ring_tile, wgmma_layout, whole_descriptor,
)
from mgqa.kernels.plan import PassPlan


@gluon.jit
def _softmax_step(s, m_i, l_i, cols, q_pos, n_k, qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Online-softmax update for one block of raw scores s: (p, alpha, m_new, l_new), log2 units."""
    if MASKED:
        keep = cols[None, :] < n_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= q_pos[:, None])
        s = gl.where(keep, s, float("-inf"))
    # m_i starts at a finite -1e30, so a row with every key masked gets p = 0 instead of NaN.
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _consume_blocks(acc, m_i, l_i, p_op, q_tile, k_smem, v_smem, kv_ready, kv_empty, start, stop, q_pos, n_k,
                    qk_scale, base, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Blocks [start, stop) after the first: S_j and P_{j-1} V_{j-1} issued together, the softmax of
    S_j computed while P·V runs, then block j-1's buffer released to the producer. Block j sits in
    ring buffer number base + j (base: the blocks of the program's earlier query tiles)."""
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    s_layout: gl.constexpr = wgmma_layout(TILE_N)
    o_layout: gl.constexpr = acc.type.layout
    TILE_M: gl.constexpr = q_tile.type.shape[0]
    zero_s = gl.zeros([TILE_M, TILE_N], gl.float32, s_layout)
    offs_n = gl.arange(0, TILE_N, layout=gl.SliceLayout(0, s_layout))
    for j in range(start, stop):
        stage = (base + j) % NSTAGES
        prev = (base + j - 1) % NSTAGES
        mbarrier.wait(kv_ready.index(stage), ((base + j) // NSTAGES) & 1)
        s = warpgroup_mma(q_tile, ring_tile(k_smem, stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, ring_tile(v_smem, prev), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))  # S_j ready; P_{j-1} V_{j-1} may still run
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j * TILE_N + offs_n, q_pos, n_k, qk_scale, MASKED, CAUSAL)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(prev), count=1)  # one thread; the matmuls reading it are done
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(q_tile.dtype), register_operand_layout(o_layout))
    return acc, m_i, l_i, p_op


@gluon.jit
def _consume_tile(q_tile, k_smem, v_smem, kv_ready, kv_empty, q_empty, first_row, n_blocks, n_q, n_k, qk_scale,
                  base, CAUSAL: gl.constexpr):
    """(acc, m_i, l_i) of one warpgroup's rows from first_row over the tile's n_blocks key blocks,
    streamed through the ring from buffer number ``base`` on (the other warpgroup may need one block
    more; this one releases the blocks it does not need). Arrives on ``q_empty`` once this
    warpgroup's last Q Kᵀ is done, so that the next tile's Q may load."""
    TILE_M: gl.constexpr = q_tile.type.shape[0]
    HEAD: gl.constexpr = q_tile.type.shape[1]
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    s_layout: gl.constexpr = wgmma_layout(TILE_N)
    o_layout: gl.constexpr = wgmma_layout(HEAD)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    # Key blocks this warpgroup needs, and how many of them need no mask.
    hi_full, n_own = key_blocks(first_row, TILE_M, n_q, n_k, TILE_N, CAUSAL)
    q_pos = first_row + gl.arange(0, TILE_M, layout=row_s) + (n_k - n_q)
    acc = gl.zeros([TILE_M, HEAD], gl.float32, o_layout)
    m_i = gl.full([TILE_M], -1.0e30, gl.float32, row_s)
    l_i = gl.zeros([TILE_M], gl.float32, row_s)
    if n_own > 0:
        # Block 0: scores and softmax, no P·V yet (always masked: cheap, and it may be the diagonal).
        zero_s = gl.zeros([TILE_M, TILE_N], gl.float32, s_layout)
        mbarrier.wait(kv_ready.index(base % NSTAGES), (base // NSTAGES) & 1)
        s = warpgroup_mma(q_tile, ring_tile(k_smem, base % NSTAGES).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))
        cols = gl.arange(0, TILE_N, layout=gl.SliceLayout(0, s_layout))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, cols, q_pos, n_k, qk_scale, True, CAUSAL)
        p_op = gl.convert_layout(p.to(q_tile.dtype), register_operand_layout(o_layout))
        mid = gl.maximum(gl.minimum(hi_full, n_own), 1)
        acc, m_i, l_i, p_op = _consume_blocks(acc, m_i, l_i, p_op, q_tile, k_smem, v_smem, kv_ready, kv_empty, 1,
                                              mid, q_pos, n_k, qk_scale, base, False, CAUSAL)
        acc, m_i, l_i, p_op = _consume_blocks(acc, m_i, l_i, p_op, q_tile, k_smem, v_smem, kv_ready, kv_empty, mid,
                                              n_own, q_pos, n_k, qk_scale, base, True, CAUSAL)
        mbarrier.arrive(q_empty, count=1)
        last = (base + n_own - 1) % NSTAGES
        acc = warpgroup_mma(p_op, ring_tile(v_smem, last), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(last), count=1)
    else:
        mbarrier.arrive(q_empty, count=1)
    # Blocks only the other warpgroup needs: wait for each (so that this release counts towards the
    # right phase) and release it.
    for j in range(n_own, n_blocks):
        mbarrier.wait(kv_ready.index((base + j) % NSTAGES), ((base + j) // NSTAGES) & 1)
        mbarrier.arrive(kv_empty.index((base + j) % NSTAGES), count=1)
    return acc, m_i, l_i


@gluon.jit
def _store_rows(acc, m_i, l_i, Out, Lse, out_row0, first_row, n_q):
    """Out and lse of one warpgroup's rows. Rows that see no key (causal with n_q > n_k) output 0 and
    store lse = +inf, so the backward's exp2(s - lse) is 0 for them."""
    TILE_M: gl.constexpr = acc.type.shape[0]
    HEAD: gl.constexpr = acc.type.shape[1]
    o_layout: gl.constexpr = acc.type.layout
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    row_s: gl.constexpr = m_i.type.layout
    empty = l_i == 0.0
    lse = gl.where(empty, float("inf"), m_i + gl.log2(gl.where(empty, 1.0, l_i)))
    l_o = gl.convert_layout(gl.where(empty, 1.0, l_i), row_o)
    out = acc / l_o[:, None]
    rows_o = first_row + gl.arange(0, TILE_M, layout=row_o)
    offs_d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, o_layout))
    ptrs = Out + (out_row0 + rows_o).to(gl.int64)[:, None] * HEAD + offs_d[None, :]
    gl.store(ptrs, out.to(Out.dtype.element_ty), mask=(rows_o < n_q)[:, None])
    rows_s = first_row + gl.arange(0, TILE_M, layout=row_s)
    gl.store(Lse + (out_row0 + rows_s).to(gl.int64), lse, mask=rows_s < n_q)


@gluon.jit
def _tile_blocks(tile, n_tiles, n_q, n_k, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, TILE_M: gl.constexpr,
                 TILE_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(batch, KV head, head, first row, key blocks both warpgroups need) of query tile ``tile``."""
    batch, kv_head, head, q_start = query_block_at(tile, n_tiles, n_q, heads, GROUP, 2 * TILE_M, CAUSAL,
                                                   SECTION_PROGRAMS, SECTION_CHUNKS)
    _, n_blocks = key_blocks(q_start, 2 * TILE_M, n_q, n_k, TILE_N, CAUSAL)
    return batch, kv_head, head, q_start, n_blocks


@gluon.jit
def _walk_tiles(args, visit: gl.constexpr, WG: gl.constexpr, CAUSAL: gl.constexpr, SCHEDULED: gl.constexpr):
    """This program's query tiles, in order: positions p, p + P, p + 2P, ... of the launch order, or
    with SCHEDULED its row of the host's schedule. ``visit(args, (batch, KV head, head, first row,
    key blocks), base, i, WG, CAUSAL)`` does one partition's work for the program's i-th tile, whose
    K/V blocks take ring buffers from number ``base`` on: every partition walks the same tiles, so
    they agree on each buffer's use count and hence on its barrier phases."""
    n_tiles = args[12]
    n_q = args[13]
    base = n_q * 0  # ring buffers used by earlier tiles (a run-time value: it is carried by the loop)
    i = n_q * 0
    if SCHEDULED:
        Schedule, Rounds, max_rounds = args[20], args[21], args[22]
        row = Schedule + gl.program_id(0) * max_rounds
        for r in range(gl.load(Rounds + gl.program_id(0))):
            base, i = _visit_tile(args, gl.load(row + r), base, i, visit, WG, CAUSAL)
    else:
        for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
            base, i = _visit_tile(args, tile, base, i, visit, WG, CAUSAL)


@gluon.jit
def _visit_tile(args, tile, base, i, visit: gl.constexpr, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """``visit`` on launch-order position ``tile``; the next tile's (base, i)."""
    TILE_M: gl.constexpr = args[3].type.shape[-2]
    TILE_N: gl.constexpr = args[4].type.shape[-2]
    where = _tile_blocks(tile, args[12], args[13], args[14], args[15], args[16], args[17], args[18], TILE_M, TILE_N,
                         CAUSAL)
    visit(args, where, base, i, WG, CAUSAL)
    return base + where[4], i + 1


@gluon.jit
def _pfwd_producer(args, CAUSAL: gl.constexpr, SCHEDULED: gl.constexpr):
    _walk_tiles(args, _produce_tile, 0, CAUSAL, SCHEDULED)


@gluon.jit
def _produce_tile(args, where, base, i, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """The producer's work for one query tile (``_walk_tiles``; WG, CAUSAL unused): its Q, then its K/V."""
    q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty = args[:10]
    batch, kv_head, head, q_start, n_blocks = where
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    # A fresh mbarrier counts as having completed the phase before its first.
    mbarrier.wait(q_empty, (i & 1) ^ 1)
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [batch, head, q_start, 0], q_ready, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [batch, head, q_start + TILE_M, 0], q_ready, q_smem.index(1))
    for j in range(n_blocks):
        stage = (base + j) % NSTAGES
        mbarrier.wait(kv_empty.index(stage), (((base + j) // NSTAGES) & 1) ^ 1)
        bar = kv_ready.index(stage)
        mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, kv_head, j * TILE_N, 0], bar, k_smem.index(stage))
        tma.async_copy_global_to_shared(v_desc, [batch, kv_head, j * TILE_N, 0], bar, v_smem.index(stage))


@gluon.jit
def _pfwd_consume(args, WG: gl.constexpr, CAUSAL: gl.constexpr, SCHEDULED: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple."""
    _walk_tiles(args, _consume_query_tile, WG, CAUSAL, SCHEDULED)


@gluon.jit
def _consume_query_tile(args, where, base, i, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """Warpgroup WG's work for one query tile (``_walk_tiles``): its rows' output and lse."""
    _, _, _, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, Out, Lse, _, n_q, n_k, heads = args[:16]
    qk_scale = args[19]
    batch, kv_head, head, q_start, n_blocks = where
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    first_row = q_start + WG * TILE_M
    mbarrier.wait(q_ready, i & 1)
    acc, m_i, l_i = _consume_tile(ring_tile(q_smem, WG), k_smem, v_smem, kv_ready, kv_empty, q_empty, first_row,
                                  n_blocks, n_q, n_k, qk_scale, base, CAUSAL)
    _store_rows(acc, m_i, l_i, Out, Lse, (batch * heads + head).to(gl.int64) * n_q, first_row, n_q)


@gluon.jit
def _attn_fwd_ws_persistent(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    batch, n_q, n_k, heads, GROUP, qk_scale, SECTION_PROGRAMS, SECTION_CHUNKS, n_tiles, Schedule, Rounds, max_rounds,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, SCHEDULED: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    kv_heads = heads // GROUP
    # Descriptors over the whole inputs, made once.
    q_desc = whole_descriptor(Q, batch, heads, n_q, stride_qb, stride_qh, stride_qn, BLOCK_M, HEAD_DIM)
    k_desc = whole_descriptor(K, batch, kv_heads, n_k, stride_kb, stride_kh, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = whole_descriptor(V, batch, kv_heads, n_k, stride_vb, stride_vh, stride_vn, BLOCK_N, HEAD_DIM)
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    mbarrier.init(q_empty, count=2)
    kv_ready, kv_empty = buffer_barriers(STAGES)
    args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, Out, Lse, n_tiles,
            n_q, n_k, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, qk_scale, Schedule, Rounds, max_rounds)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_pfwd_consume, (args, 0, CAUSAL, SCHEDULED)), (_pfwd_consume, (args, 1, CAUSAL, SCHEDULED)),
                        (_pfwd_producer, (args, CAUSAL, SCHEDULED))], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def launch(q, k, v, out, lse, causal: bool, qk_scale: float, p: PassPlan, schedule: torch.Tensor,
           rounds: torch.Tensor) -> None:
    """Run the forward: q (B, H, Nq, 128), k/v (B, Hkv, Nk, 128) with unit last stride and 16-byte
    aligned rows; out (B, H, Nq, 128) contiguous and lse (B, H, Nq) float32 are written; qk_scale
    (> 0) in log2 units. ``p`` is the plan's forward pass (kernel "gluon_persistent"): ``p.programs``
    programs, tiles ``p.tiles`` (block_m, block_n, num_stages), launch-order sections ``p.walk``.
    With ``p.first_free``, program i takes launch-order positions ``schedule[i, :rounds[i]]``
    (schedule (programs, max_rounds), rounds (programs,), int32 on q's device, from
    ``plan.forward_schedule``); otherwise both are ignored (a one-element int32 tensor will do). The
    caller has set Triton's allocator: the in-kernel tensor descriptors need global scratch."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    tiles = p.tiles
    n_tiles = batch * heads * triton.cdiv(n_q, 2 * tiles.block_m)
    _attn_fwd_ws_persistent[(p.programs,)](
        q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), batch, n_q, n_k, heads, heads // kv_heads, qk_scale, p.walk.programs,
        p.walk.chunks, n_tiles, schedule, rounds, schedule.shape[-1],
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, STAGES=tiles.num_stages, CAUSAL=causal,
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, SCHEDULED=p.first_free, num_warps=NUM_WARPS,
        maxnreg=MAXNREG,
    )
