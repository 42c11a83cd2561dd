"""Warp-specialised forward kernel for Hopper (sm_90), written in Gluon, Triton's lower-level dialect.

The structure FlashAttention-3 uses, which plain ``tl`` code cannot express:

- a one-warp *producer* issues every TMA load: the program's two Q tiles, then K/V blocks through
  ``STAGES`` shared-memory buffers, each refilled once both consumers have released it;
- two *consumer* warpgroups each own ``BLOCK_M`` query rows of the program's ``2 * BLOCK_M`` and
  share every K/V tile. Each issues S_j = Q K_jᵀ and O += P_{j-1} V_{j-1} back to back, waits for
  S_j only, and computes block j's softmax while the P·V matmul runs;
- registers move from the producer to the consumers (``setmaxnreg``);
- with ``PINGPONG``, the two consumers take turns to issue their matmuls (FlashAttention-3's
  ping-pong schedule): one warpgroup's matmuls run while the other computes its softmax, instead of
  both issuing at once and then both leaving the tensor cores idle. Each warpgroup takes one turn
  per key block the program streams, plus one for its last P·V, whether or not it needs the block,
  so that the two always take the same number of turns (opt-in: measured level or slower).

``_attn_fwd_ws`` runs one program per query tile of ``2 * BLOCK_M`` rows; ``_attn_fwd_ws_persistent``
(the default) one program per SM, walking the tiles, each tile's Q load and first K/V
loads overlapping the previous tile's last P·V and output store. Both run the same tile body
(``_consume_tile``).

Same contract as ``attention_fwd._attn_fwd``: (B, H, Nq, D) queries, (B, Hkv, Nk, D) keys and
values with any row strides, query head h reads KV head h // GROUP, bottom-right causal alignment,
out (B, H, Nq, D) contiguous, lse in log2 units with +inf for rows that see no key. Lengths are
arbitrary: the copy engine zero-fills rows past the end, and the last key block is masked.

Only for head_dim 128 in fp16/bf16 with a positive scale (where it was measured faster; see
``unsupported_reason``); Gluon has no CPU interpreter, so CPU CI compiles it for sm_90
(tests/kernels/test_compile.py) and the GPU suite checks its results.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from mgqa.kernels import gluon_common
from mgqa.kernels.gluon_common import CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS  # noqa: F401 (launch settings)
from mgqa.kernels.gluon_common import (
    buffer_barriers, head_rows_descriptor, key_blocks, kv_descriptors, kv_ring, query_block_at, query_block_program,
    cached, first_free_schedule, ring_tile, schedule_tensors, stream_kv, register_operand_layout, turn_barriers,
    turn_pass, turn_wait, wgmma_layout, whole_descriptor,
)

BLOCK_M = 64  # query rows per consumer warpgroup (a program covers 2 * BLOCK_M)
BLOCK_N = 128  # keys per K/V block
STAGES = 3  # K/V buffers in flight: 3 x 64 KB + 32 KB of Q at head_dim 128
HEAD_DIMS = (128,)


def unsupported_reason(head_dim: int, dtype_name: str, capability: tuple[int, int], *, scale: float) -> Optional[str]:
    """None if the warp-specialised forward runs this case, else why the ``tl`` kernel is used."""
    reason = gluon_common.unsupported_reason(head_dim, dtype_name, capability, HEAD_DIMS)
    if reason is None and not scale > 0:
        reason = f"scale {scale} (the softmax folds a positive scale into exp2)"
    return reason


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, Out, Lse,
                 q_start, n_blocks, n_q, n_k, out_row0, qk_scale):
    # Tile sizes come from the buffers: the shared argument tuple is assigned, which makes any
    # constexpr in it a run-time value.
    TILE_M: gl.constexpr = q_smem.type.shape[1]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_start, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_start + TILE_M, 0], q_bar, q_smem.index(1))
    stream_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, n_blocks)


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
def _consume_blocks(acc, m_i, l_i, p_op, q_tile, k_smem, v_smem, kv_ready, kv_empty, turn, start, stop, q_pos, n_k,
                    qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr, WG: gl.constexpr,
                    PINGPONG: gl.constexpr, base=0):
    """Blocks [start, stop) after the first: S_j and P_{j-1} V_{j-1} issued together (turn j), the
    softmax of S_j computed while P·V runs, then block j-1's buffer released to the producer. Block
    j sits in ring buffer number base + j (base: the blocks of the program's earlier query tiles)."""
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
        turn_wait(turn, j, WG, PINGPONG)
        s = warpgroup_mma(q_tile, ring_tile(k_smem, stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, ring_tile(v_smem, prev), acc, is_async=True)
        turn_pass(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(1, deps=(s,))  # S_j ready; P_{j-1} V_{j-1} may still run
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j * TILE_N + offs_n, q_pos, n_k, qk_scale, MASKED, CAUSAL)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(prev), count=1)  # one thread; the matmuls reading it are done
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        p_op = gl.convert_layout(p.to(q_tile.dtype), register_operand_layout(o_layout))
    return acc, m_i, l_i, p_op


@gluon.jit
def _consume_tile(q_tile, k_smem, v_smem, kv_ready, kv_empty, turn, q_empty, first_row, n_blocks, n_q, n_k,
                  qk_scale, base, CAUSAL: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
                  RELEASE_Q: gl.constexpr):
    """(acc, m_i, l_i) of warpgroup WG's rows from first_row over the program's n_blocks key blocks,
    streamed through the ring from buffer number ``base`` on (the other warpgroup may need one block
    more; this one releases the blocks it does not need). RELEASE_Q: arrive on ``q_empty`` once this
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
        turn_wait(turn, 0, WG, PINGPONG)
        s = warpgroup_mma(q_tile, ring_tile(k_smem, base % NSTAGES).permute((1, 0)), zero_s, use_acc=False,
                          is_async=True)
        turn_pass(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(0, deps=(s,))
        cols = gl.arange(0, TILE_N, layout=gl.SliceLayout(0, s_layout))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, cols, q_pos, n_k, qk_scale, True, CAUSAL)
        p_op = gl.convert_layout(p.to(q_tile.dtype), register_operand_layout(o_layout))
        mid = gl.maximum(gl.minimum(hi_full, n_own), 1)
        acc, m_i, l_i, p_op = _consume_blocks(acc, m_i, l_i, p_op, q_tile, k_smem, v_smem, kv_ready, kv_empty, turn,
                                              1, mid, q_pos, n_k, qk_scale, False, CAUSAL, WG, PINGPONG, base)
        acc, m_i, l_i, p_op = _consume_blocks(acc, m_i, l_i, p_op, q_tile, k_smem, v_smem, kv_ready, kv_empty, turn,
                                              mid, n_own, q_pos, n_k, qk_scale, True, CAUSAL, WG, PINGPONG, base)
        if RELEASE_Q:
            mbarrier.arrive(q_empty, count=1)
        last = (base + n_own - 1) % NSTAGES
        turn_wait(turn, n_own, WG, PINGPONG)
        acc = warpgroup_mma(p_op, ring_tile(v_smem, last), acc, is_async=True)
        turn_pass(turn, WG, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(last), count=1)
    else:
        if RELEASE_Q:
            mbarrier.arrive(q_empty, count=1)
        turn_wait(turn, 0, WG, PINGPONG)  # this warpgroup's turn 0 (it has nothing to issue)
        turn_pass(turn, WG, PINGPONG)
    # Blocks only the other warpgroup needs: wait for each (so that this release counts towards the
    # right phase) and release it; each is a turn with nothing to issue.
    for j in range(n_own, n_blocks):
        turn_wait(turn, j + 1, WG, PINGPONG)
        turn_pass(turn, WG, PINGPONG)
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
def _ws_consume(args, WG: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple."""
    _, _, _, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, Out, Lse, q_start, n_blocks, n_q, n_k, \
        out_row0, qk_scale = args
    TILE_M: gl.constexpr = q_smem.type.shape[1]
    first_row = q_start + WG * TILE_M
    mbarrier.wait(q_bar, 0)
    acc, m_i, l_i = _consume_tile(q_smem.index(WG), k_smem, v_smem, kv_ready, kv_empty, turn, q_bar, first_row,
                                  n_blocks, n_q, n_k, qk_scale, 0, CAUSAL, WG, PINGPONG, False)
    _store_rows(acc, m_i, l_i, Out, Lse, out_row0, first_row, n_q)


@gluon.jit
def _attn_fwd_ws(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    n_q, n_k, heads, GROUP, qk_scale, SECTION_PROGRAMS, SECTION_CHUNKS,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PINGPONG: gl.constexpr = False,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    batch, kv_head, head, q_start = query_block_program(n_q, heads, GROUP, 2 * BLOCK_M, CAUSAL, SECTION_PROGRAMS,
                                                           SECTION_CHUNKS)

    q_desc = head_rows_descriptor(Q, batch, head, stride_qb, stride_qh, stride_qn, n_q, BLOCK_M, HEAD_DIM)
    k_desc, v_desc = kv_descriptors(K, V, batch, kv_head, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                                    stride_vn, n_k, BLOCK_N, HEAD_DIM)

    _, n_blocks = key_blocks(q_start, 2 * BLOCK_M, n_q, n_k, BLOCK_N, CAUSAL)  # what both warpgroups need

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem, v_smem, q_bar, kv_ready, kv_empty = kv_ring(k_desc, v_desc, STAGES)
    turn = turn_barriers()

    out_row0 = (batch * heads + head).to(gl.int64) * n_q
    args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, kv_ready, kv_empty, turn, Out, Lse, q_start,
            n_blocks, n_q, n_k, out_row0, qk_scale)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_ws_consume, (args, 0, CAUSAL, PINGPONG)), (_ws_consume, (args, 1, CAUSAL, PINGPONG)),
                        (_ws_producer, args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# The persistent variant (opt-in, ``launch(persistent=True)``): one program per SM walks query tiles
# pid, pid + P, pid + 2P, ... of the launch order above. Its producer loads the next tile's Q as soon
# as both consumers have issued their last Q Kᵀ of the tile, and streams that tile's K/V through the
# same ring without a break, so a tile's set-up (Q and first K/V loads) and the previous tile's
# last P·V and output store overlap instead of running one after the other.


@gluon.jit
def _tile_blocks(tile, n_tiles, n_q, n_k, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, TILE_M: gl.constexpr,
                 TILE_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(batch, head, first row, key blocks both warpgroups need) of query tile ``tile``."""
    batch, kv_head, head, q_start = query_block_at(tile, n_tiles, n_q, heads, GROUP, 2 * TILE_M, CAUSAL,
                                                   SECTION_PROGRAMS, SECTION_CHUNKS)
    _, n_blocks = key_blocks(q_start, 2 * TILE_M, n_q, n_k, TILE_N, CAUSAL)
    return batch, kv_head, head, q_start, n_blocks


@gluon.jit
def _walk_tiles(args, visit: gl.constexpr, WG: gl.constexpr, CAUSAL: gl.constexpr, SCHEDULED: gl.constexpr):
    """This program's query tiles, in order: positions p, p + P, p + 2P, ... of the launch order, or
    with SCHEDULED its list from ``forward_schedule``; ``visit(args, (batch, KV head, head, first
    row, key blocks), base, i, WG, CAUSAL)`` does one partition's work for the program's i-th tile, whose
    K/V blocks take ring buffers from number ``base`` on."""
    n_tiles = args[13]
    n_q = args[14]
    base = n_q * 0  # ring buffers used by earlier tiles (a run-time value: it is carried by the loop)
    i = n_q * 0
    if SCHEDULED:
        Schedule, Rounds, max_rounds = args[21], args[22], args[23]
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
    where = _tile_blocks(tile, args[13], args[14], args[15], args[16], args[17], args[18], args[19], TILE_M, TILE_N,
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
    """Consumer warpgroup WG's partition of the persistent forward; ``args`` is the producer's."""
    _walk_tiles(args, _consume_query_tile, WG, CAUSAL, SCHEDULED)


@gluon.jit
def _consume_query_tile(args, where, base, i, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """Warpgroup WG's work for one query tile (``_walk_tiles``): its rows' output and lse."""
    _, _, _, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, turn, Out, Lse, _, n_q, n_k, heads = \
        args[:17]
    qk_scale = args[20]
    batch, kv_head, head, q_start, n_blocks = where
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    first_row = q_start + WG * TILE_M
    mbarrier.wait(q_ready, i & 1)
    acc, m_i, l_i = _consume_tile(ring_tile(q_smem, WG), k_smem, v_smem, kv_ready, kv_empty, turn, q_empty, first_row,
                                  n_blocks, n_q, n_k, qk_scale, base, CAUSAL, WG, False, True)
    _store_rows(acc, m_i, l_i, Out, Lse, (batch * heads + head).to(gl.int64) * n_q, first_row, n_q)


@gluon.jit
def _attn_fwd_ws_persistent(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    batch, n_q, n_k, heads, GROUP, qk_scale, SECTION_PROGRAMS, SECTION_CHUNKS, n_tiles, Schedule, Rounds, max_rounds,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, SCHEDULED: gl.constexpr = False,
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
    turn = turn_barriers()  # unused: no turns here (the forward's measured level without them)
    args = (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, kv_ready, kv_empty, turn, Out, Lse,
            n_tiles, n_q, n_k, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, qk_scale, Schedule, Rounds, max_rounds)
    gl.warp_specialize([(_pfwd_consume, (args, 0, CAUSAL, SCHEDULED)), (_pfwd_consume, (args, 1, CAUSAL, SCHEDULED)),
                        (_pfwd_producer, (args, CAUSAL, SCHEDULED))], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


MAX_PROGRAMS: Optional[int] = None  # programs of the persistent launch (default: one per SM); tests lower it
# A tile's set-up (Q load, first K/V blocks, output store) in key blocks, for the schedule's cost model.
TILE_SETUP_BLOCKS = 1
_schedules: dict = {}  # launch parameters -> (schedule, rounds) on the device, the newest MAX_SCHEDULES
MAX_SCHEDULES = 64
_no_schedule: dict = {}  # device -> a one-entry int32 tensor standing in for the schedule of a strided launch


def tile_order(n_tiles: int, n_q: int, heads: int, group: int, causal: bool, section_programs: int,
               section_chunks: int) -> list[tuple[int, int, int, int]]:
    """(batch, KV head, member, first row) of each launch-order position of 2 * BLOCK_M-row query
    tiles: ``attention_common._query_block_at`` on the host."""
    rows = 2 * BLOCK_M
    num_m = -(-n_q // rows)
    per_kv = group * num_m
    n_chunks = n_tiles // per_kv
    kv_heads = heads // group
    section = max(min(-(-section_programs // per_kv), section_chunks), 1)
    order = []
    for pid in range(n_tiles):
        first = pid // (section * per_kv) * section
        within = pid - first * per_kv
        per_block = min(section, n_chunks - first) * group
        pid_m, rest = divmod(within, per_block)
        if causal:
            pid_m = num_m - 1 - pid_m
        pid_bkv = first + rest // group
        order.append((pid_bkv // kv_heads, pid_bkv % kv_heads, rest % group, pid_m * rows))
    return order


def tile_blocks(first_row: int, n_q: int, n_k: int, causal: bool) -> int:
    """Key blocks a query tile from ``first_row`` streams (``gluon_common.key_blocks``' count)."""
    hi = min(max(first_row + 2 * BLOCK_M + n_k - n_q, 0), n_k) if causal else n_k
    return -(-hi // BLOCK_N)


def forward_schedule(batch: int, heads: int, kv_heads: int, n_q: int, n_k: int, causal: bool, programs: int,
                     sections: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(schedule, rounds) of a first-free persistent forward, cached per launch parameters: program p
    takes launch-order positions ``schedule[p, :rounds[p]]`` (int32, on ``device``), each position
    going to the program that frees up first, as the hardware assigns one-tile programs."""
    key = (batch, heads, kv_heads, n_q, n_k, bool(causal), programs, sections["SECTION_PROGRAMS"],
           sections["SECTION_CHUNKS"], str(device))

    def build():
        n_tiles = batch * heads * triton.cdiv(n_q, 2 * BLOCK_M)
        order = tile_order(n_tiles, n_q, heads, heads // kv_heads, causal, sections["SECTION_PROGRAMS"],
                           sections["SECTION_CHUNKS"])
        costs = [tile_blocks(first_row, n_q, n_k, causal) + TILE_SETUP_BLOCKS for _, _, _, first_row in order]
        table, rounds = schedule_tensors(first_free_schedule(costs, programs), list(range(n_tiles)))
        return table.to(device), rounds.to(device)

    return cached(_schedules, key, build, MAX_SCHEDULES)


def launch(q, k, v, out, lse, causal: bool, qk_scale: float, sections: Optional[dict] = None,
           pingpong: bool = False, persistent: bool = False, first_free: bool = False) -> None:
    """Run the kernel: q (B, H, Nq, 128), k/v (B, Hkv, Nk, 128) with unit last stride and 16-byte
    aligned rows; out (B, H, Nq, 128) contiguous; lse (B, H, Nq) float32; qk_scale in log2 units;
    ``sections`` the SECTION_PROGRAMS and SECTION_CHUNKS of the launch order (default: one chunk per
    section); ``pingpong``: the consumers take turns to issue matmuls; ``persistent``: one program
    per SM walks the query tiles (``_attn_fwd_ws_persistent``; without turns): positions p, p + P,
    p + 2P, ... of the launch order, or with ``first_free`` the lists of ``forward_schedule``. The
    caller has set Triton's allocator (in-kernel descriptors need global scratch)."""
    sections = sections or dict(SECTION_PROGRAMS=1, SECTION_CHUNKS=1)
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    tiles = batch * heads * triton.cdiv(n_q, 2 * BLOCK_M)
    if first_free and not persistent:
        raise ValueError("first_free=True: the first-free schedule is the persistent forward's (persistent=True)")
    if persistent:
        if pingpong:
            raise ValueError("the persistent forward does not take turns (pingpong=True)")
        programs = min(tiles, MAX_PROGRAMS or torch.cuda.get_device_properties(q.device).multi_processor_count)
        if first_free:
            schedule, rounds = forward_schedule(batch, heads, kv_heads, n_q, n_k, causal, programs, sections,
                                                q.device)
        else:
            if q.device not in _no_schedule:
                _no_schedule[q.device] = torch.zeros(1, dtype=torch.int32, device=q.device)
            schedule = rounds = _no_schedule[q.device]
        _attn_fwd_ws_persistent[(programs,)](
            q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), batch, n_q, n_k, heads, heads // kv_heads, qk_scale,
            sections["SECTION_PROGRAMS"], sections["SECTION_CHUNKS"], tiles, schedule, rounds, schedule.shape[-1],
            HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, CAUSAL=causal,
            CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, SCHEDULED=first_free, num_warps=NUM_WARPS,
            maxnreg=MAXNREG,
        )
        return
    grid = (tiles,)
    _attn_fwd_ws[grid](
        q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), n_q, n_k, heads, heads // kv_heads, qk_scale,
        sections["SECTION_PROGRAMS"], sections["SECTION_CHUNKS"], HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, CAUSAL=causal,
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, PINGPONG=pingpong, num_warps=NUM_WARPS,
        maxnreg=MAXNREG,
    )
