"""Warp-specialised attention dQ kernel for Hopper (sm_90), written in Gluon: the forward's structure
(``gluon_fwd``) applied to the backward's query-block loop.

It computes what ``tl_dq._attn_bwd_dq`` does: dQ of q (B, H, Nq, D) against k, v (B, Hkv, Nk, D),
scaled by ``sm_scale`` and written in the inputs' dtype, from the forward's output, its lse (log2
units, +inf for rows that see no key) and dO; and each row's delta = sum_d O dO (float32), which the
dK/dV kernel reads. Deterministic: each dQ row is summed in one program's registers.

One program owns ``2 * BLOCK_M`` query rows of one query head, in the tl kernels' launch order:

- a one-warp *producer* loads both consumers' Q and dO tiles, then streams K/V blocks through
  ``STAGES`` shared-memory buffers, each refilled once both consumers have released it;
- two *consumer* warpgroups each own ``BLOCK_M`` rows. A consumer first computes its rows' delta,
  then per key block j issues S_j = Q K_jᵀ, dP_j = dO V_jᵀ and block j-1's dQ += dS_{j-1} K_{j-1}
  together, computes P_j while dP_j runs and dS_j while the dQ matmul runs (as the forward computes
  the softmax under P·V), then releases block j-1's buffer.

Only for head_dim 128 in fp16/bf16 (``plan.py`` decides). Gluon has no CPU interpreter: CPU CI
compiles the kernel for sm_90 (``compile_check``) and the GPU suite checks it.
"""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from mgqa.kernels.gluon_common import (
    CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS, head_rows_descriptor, key_blocks, kv_descriptors, kv_ring,
    query_block_program, register_operand_layout, stream_kv, wgmma_layout,
)
from mgqa.kernels.plan import PassPlan


@gluon.jit
def _dq_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, qd_bar, kv_ready, kv_empty,
                 O, stride_on, Lse, Delta, DQ, q_start, n_blocks, n_q, n_k, row0, qk_scale, sm_scale):
    # Tile sizes come from the buffers: the shared argument tuple is assigned, which makes any
    # constexpr in it a run-time value.
    TILE_M: gl.constexpr = q_smem.type.shape[1]
    mbarrier.expect(qd_bar, 4 * q_desc.block_type.nbytes)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [q_start + c * TILE_M, 0], qd_bar, q_smem.index(c))
        tma.async_copy_global_to_shared(do_desc, [q_start + c * TILE_M, 0], qd_bar, do_smem.index(c))
    stream_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, n_blocks)


@gluon.jit
def _dq_scores(q_tile, k_smem, j, lse, delta, q_pos, n_k, qk_scale, s, dp, MASKED: gl.constexpr,
               CAUSAL: gl.constexpr, LEFT: gl.constexpr):
    """dS of block j (in the registers' operand layout) from its issued S and dP matmuls, with LEFT
    more matmuls issued after them (they may still run)."""
    TILE_M: gl.constexpr = q_tile.type.shape[0]
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    s_layout: gl.constexpr = wgmma_layout(TILE_N)
    op_layout: gl.constexpr = register_operand_layout(wgmma_layout(q_tile.type.shape[1]))
    s = warpgroup_mma_wait(LEFT + 1, deps=(s,))  # S ready; dP may still run
    p = gl.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        cols = j * TILE_N + gl.arange(0, TILE_N, layout=gl.SliceLayout(0, s_layout))
        keep = cols[None, :] < n_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= q_pos[:, None])
        p = gl.where(keep, p, 0.0)
    dp = warpgroup_mma_wait(LEFT, deps=(dp,))
    return gl.convert_layout((p * (dp - delta[:, None])).to(q_tile.dtype), op_layout)


@gluon.jit
def _dq_blocks(dq, ds, q_tile, do_tile, k_smem, v_smem, kv_ready, kv_empty, lse, delta, start, stop, q_pos, n_k,
               qk_scale, MASKED: gl.constexpr, CAUSAL: gl.constexpr):
    """Blocks [start, stop) after the first: S_j, dP_j and dQ += dS_{j-1} K_{j-1} issued together,
    P_j computed while dP_j runs and dS_j while the dQ matmul runs, then block j-1's
    buffer released to the producer. ``ds`` is dS_{j-1}; returns (dq, dS of the last block)."""
    TILE_M: gl.constexpr = q_tile.type.shape[0]
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    zero_s = gl.zeros([TILE_M, TILE_N], gl.float32, wgmma_layout(TILE_N))
    for j in range(start, stop):
        stage = j % NSTAGES
        prev = (j - 1) % NSTAGES
        mbarrier.wait(kv_ready.index(stage), (j // NSTAGES) & 1)
        s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp = warpgroup_mma(do_tile, v_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dq = warpgroup_mma(ds, k_smem.index(prev), dq, is_async=True)
        ds_next = _dq_scores(q_tile, k_smem, j, lse, delta, q_pos, n_k, qk_scale, s, dp, MASKED, CAUSAL, 1)
        # dS_{j-1} stays in its registers until the matmul reading it is done.
        dq, ds = warpgroup_mma_wait(0, deps=(dq, ds))
        mbarrier.arrive(kv_empty.index(prev), count=1)  # one thread; the matmuls reading it are done
        ds = ds_next
    return dq, ds


@gluon.jit
def _dq_rows(q_tile, do_tile, k_smem, v_smem, kv_ready, kv_empty, lse, delta, hi_full, n_own, q_pos, n_k, qk_scale,
            CAUSAL: gl.constexpr):
    """dQ (unscaled, float32) of this warpgroup's rows over its n_own > 0 key blocks, with each
    block's dQ matmul issued together with the next block's S and dP."""
    TILE_M: gl.constexpr = q_tile.type.shape[0]
    HEAD: gl.constexpr = q_tile.type.shape[1]
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    zero_s = gl.zeros([TILE_M, TILE_N], gl.float32, wgmma_layout(TILE_N))
    # Block 0: S and dP, no dQ matmul yet (always masked: cheap, and it may be the diagonal).
    mbarrier.wait(kv_ready.index(0), 0)
    s = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_tile, v_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    ds = _dq_scores(q_tile, k_smem, 0, lse, delta, q_pos, n_k, qk_scale, s, dp, True, CAUSAL, 0)
    dq = gl.zeros([TILE_M, HEAD], gl.float32, wgmma_layout(HEAD))
    mid = gl.maximum(gl.minimum(hi_full, n_own), 1)
    dq, ds = _dq_blocks(dq, ds, q_tile, do_tile, k_smem, v_smem, kv_ready, kv_empty, lse, delta, 1, mid, q_pos, n_k,
                        qk_scale, False, CAUSAL)
    dq, ds = _dq_blocks(dq, ds, q_tile, do_tile, k_smem, v_smem, kv_ready, kv_empty, lse, delta, mid, n_own, q_pos,
                        n_k, qk_scale, True, CAUSAL)
    last = (n_own - 1) % NSTAGES
    dq = warpgroup_mma(ds, k_smem.index(last), dq, is_async=True)
    dq, ds = warpgroup_mma_wait(0, deps=(dq, ds))
    mbarrier.arrive(kv_empty.index(last), count=1)
    return dq


@gluon.jit
def _dq_consume(args, WG: gl.constexpr, CAUSAL: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple."""
    _, _, _, _, q_smem, do_smem, k_smem, v_smem, qd_bar, kv_ready, kv_empty, O, stride_on, Lse, Delta, DQ, \
        q_start, n_blocks, n_q, n_k, row0, qk_scale, sm_scale = args
    TILE_M: gl.constexpr = q_smem.type.shape[1]
    HEAD: gl.constexpr = q_smem.type.shape[2]
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    s_layout: gl.constexpr = wgmma_layout(TILE_N)
    acc_layout: gl.constexpr = wgmma_layout(HEAD)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    first_row = q_start + WG * TILE_M

    # This warpgroup's rows: lse, and delta = sum_d O dO (stored for the dK/dV kernel).
    rows = first_row + gl.arange(0, TILE_M, layout=row_s)
    lse = gl.load(Lse + row0 + rows, mask=rows < n_q, other=float("inf"))
    rows_t = first_row + gl.arange(0, TILE_M, layout=gl.SliceLayout(1, tile))
    cols_t = gl.arange(0, HEAD, layout=gl.SliceLayout(0, tile))
    o = gl.load(O + rows_t.to(gl.int64)[:, None] * stride_on + cols_t[None, :], mask=(rows_t < n_q)[:, None],
                other=0.0)
    mbarrier.wait(qd_bar, 0)
    q_tile = q_smem.index(WG)
    do_tile = do_smem.index(WG)
    delta_t = gl.sum(o.to(gl.float32) * do_tile.load(tile).to(gl.float32), 1)
    gl.store(Delta + row0 + rows_t, delta_t, mask=rows_t < n_q)
    delta = gl.convert_layout(delta_t, row_s)

    hi_full, n_own = key_blocks(first_row, TILE_M, n_q, n_k, TILE_N, CAUSAL)
    q_pos = rows + (n_k - n_q)
    dq = gl.zeros([TILE_M, HEAD], gl.float32, acc_layout)
    if n_own > 0:
        dq = _dq_rows(q_tile, do_tile, k_smem, v_smem, kv_ready, kv_empty, lse, delta, hi_full, n_own, q_pos, n_k,
                      qk_scale, CAUSAL)
    # Blocks only the other warpgroup needs: wait for each (so that this release counts towards the
    # right phase) and release it.
    for j in range(n_own, n_blocks):
        mbarrier.wait(kv_ready.index(j % NSTAGES), (j // NSTAGES) & 1)
        mbarrier.arrive(kv_empty.index(j % NSTAGES), count=1)

    rows_o = first_row + gl.arange(0, TILE_M, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, acc_layout))
    gl.store(DQ + (row0 + rows_o).to(gl.int64)[:, None] * HEAD + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=(rows_o < n_q)[:, None])


@gluon.jit
def _attn_bwd_dq_ws(
    Q, K, V, DO, Out, Lse, Delta, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    stride_ob, stride_oh, stride_on,
    n_q, n_k, heads, GROUP, qk_scale, sm_scale, SECTION_PROGRAMS, SECTION_CHUNKS,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    batch, kv_head, head, q_start = query_block_program(n_q, heads, GROUP, 2 * BLOCK_M, CAUSAL, SECTION_PROGRAMS,
                                                           SECTION_CHUNKS)

    q_desc = head_rows_descriptor(Q, batch, head, stride_qb, stride_qh, stride_qn, n_q, BLOCK_M, HEAD_DIM)
    do_desc = head_rows_descriptor(DO, batch, head, stride_db, stride_dh, stride_dn, n_q, BLOCK_M, HEAD_DIM)
    k_desc, v_desc = kv_descriptors(K, V, batch, kv_head, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                                    stride_vn, n_k, BLOCK_N, HEAD_DIM)

    _, n_blocks = key_blocks(q_start, 2 * BLOCK_M, n_q, n_k, BLOCK_N, CAUSAL)  # what both warpgroups need

    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, HEAD_DIM], do_desc.layout)
    k_smem, v_smem, qd_bar, kv_ready, kv_empty = kv_ring(k_desc, v_desc, STAGES)

    row0 = (batch * heads + head).to(gl.int64) * n_q
    o_base = Out + batch.to(gl.int64) * stride_ob + head.to(gl.int64) * stride_oh
    args = (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, qd_bar, kv_ready, kv_empty, o_base,
            stride_on, Lse, Delta, DQ, q_start, n_blocks, n_q, n_k, row0, qk_scale, sm_scale)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_dq_consume, (args, 0, CAUSAL)), (_dq_consume, (args, 1, CAUSAL)), (_dq_producer, args)],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def launch(q, k, v, grad_out, out, lse, delta, dq, causal: bool, qk_scale: float, sm_scale: float,
           p: PassPlan) -> None:
    """Run the dQ pass: q, grad_out, out (B, H, Nq, 128) and k, v (B, Hkv, Nk, 128) with unit last
    stride and 16-byte aligned rows; lse (B, H, Nq) float32 from the forward; delta (B, H, Nq)
    float32 and dq (B, H, Nq, 128), both contiguous, are written. ``p`` is the plan's dQ pass (kernel
    "gluon"): tiles ``p.tiles`` (block_m, block_n, num_stages), launch-order sections ``p.walk``. The
    caller has set Triton's allocator: the in-kernel tensor descriptors need global scratch."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    tiles = p.tiles
    grid = (batch * heads * triton.cdiv(n_q, 2 * tiles.block_m),)
    _attn_bwd_dq_ws[grid](
        q, k, v, grad_out, out, lse, delta, dq, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1),
        grad_out.stride(2), out.stride(0), out.stride(1), out.stride(2), n_q, n_k, heads, heads // kv_heads,
        qk_scale, sm_scale, p.walk.programs, p.walk.chunks,
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, STAGES=tiles.num_stages, CAUSAL=causal,
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
