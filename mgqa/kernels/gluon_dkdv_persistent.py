"""The persistent Gluon dK/dV kernel (sm_90): ``gluon_dkdv``'s key-tile body, one program per SM.

It computes what ``gluon_dkdv._attn_bwd_dkdv_ws`` does with one group split. ``plan.py`` takes it
for MHA, where a key tile's program covers a single head, so its set-up (K/V load, first Q/dO
loads, dK/dV stores) weighs most, and a persistent program can hide it:

- each program walks its row of a host-made schedule (``plan.dkdv_schedule``): every key tile, in
  the tl kernels' sectioned launch order, goes to the program that frees up first, as the hardware
  hands out one-tile programs, so the tiles running at once stay neighbours in that order (sharing
  Q/dO in L2) and the programs finish together;
- the producer streams one tile's Q/dO after another through the same ring, and loads a tile's K/V
  while the consumers finish the tile before, into a second K/V buffer set where shared memory has
  room (``KV_SETS``);
- dK/dV leave through each consumer's own K/V buffers of the tile, by the copy engine (which clips
  keys past n_k): the consumer's registers are free for the next tile as soon as the copy is issued.

Launched by ``gluon_dkdv.launch`` (kernel "gluon_persistent").
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from mgqa.kernels.gluon_common import buffer_barriers, wgmma_layout, whole_descriptor
from mgqa.kernels.gluon_dkdv import dkdv_steps, query_range, skip_unseen_step


@gluon.jit
def _scheduled_tile(tile, num_n, kv_heads, n_q, n_k, causal, TILE_M: gl.constexpr, TILE_N: gl.constexpr):
    """(batch, KV head, first key, lo, mid) of schedule entry ``tile`` (``chunk * num_n + key tile``)."""
    chunk = tile // num_n
    start_n = (tile - chunk * num_n) * (2 * TILE_N)
    lo, mid = query_range(start_n, n_q, n_k, TILE_M, TILE_N, causal)
    return chunk // kv_heads, chunk % kv_heads, start_n, lo, mid


@gluon.jit
def _pbwd_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, kv_empty, ready,
                   empty, Lse, Delta, Schedule, Rounds, max_rounds, n_q, n_k, kv_heads, group, num_n, causal, qk_scale,
                   sm_scale, dk_desc, dv_desc):
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    NSTAGES: gl.constexpr = q_smem.type.shape[0]
    KV_SETS: gl.constexpr = k_smem.type.shape[0] // 2
    row = Schedule + gl.program_id(0) * max_rounds
    base = n_q * 0  # ring buffers used by earlier tiles (a run-time value: it is carried by the loop)
    for r in range(gl.load(Rounds + gl.program_id(0))):
        batch, kv_head, start_n, lo, mid = _scheduled_tile(gl.load(row + r), num_n, kv_heads, n_q, n_k, causal,
                                                           TILE_M, TILE_N)
        kv = r % KV_SETS
        # A fresh mbarrier counts as having completed the phase before its first.
        mbarrier.wait(kv_empty.index(kv), ((r // KV_SETS) & 1) ^ 1)
        bar = kv_ready.index(kv)
        mbarrier.expect(bar, 4 * k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch, kv_head, start_n, 0], bar, k_smem.index(2 * kv))
        tma.async_copy_global_to_shared(k_desc, [batch, kv_head, start_n + TILE_N, 0], bar, k_smem.index(2 * kv + 1))
        tma.async_copy_global_to_shared(v_desc, [batch, kv_head, start_n, 0], bar, v_smem.index(2 * kv))
        tma.async_copy_global_to_shared(v_desc, [batch, kv_head, start_n + TILE_N, 0], bar, v_smem.index(2 * kv + 1))
        steps = gl.cdiv(n_q - lo, TILE_M)
        for t in range(group * steps):
            g = t // steps
            start_m = lo + (t - g * steps) * TILE_M
            stage = (base + t) % NSTAGES
            mbarrier.wait(empty.index(stage), (((base + t) // NSTAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [batch, kv_head * group + g, start_m, 0], bar, q_smem.index(stage))
            tma.async_copy_global_to_shared(do_desc, [batch, kv_head * group + g, start_m, 0], bar,
                                            do_smem.index(stage))
        base += group * steps


@gluon.jit
def _pbwd_consume(args, WG: gl.constexpr, PREFETCH: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple. dK/dV leave
    through this warpgroup's own K/V buffers of the tile, by the copy engine; the buffers go back to
    the producer once the copy engine has read them."""
    _, _, _, _, q_smem, do_smem, k_smem, v_smem, kv_ready, kv_empty, ready, empty, Lse, Delta, Schedule, Rounds, \
        max_rounds, n_q, n_k, kv_heads, group, num_n, causal, qk_scale, sm_scale, dk_desc, dv_desc = args
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    HEAD: gl.constexpr = q_smem.type.shape[-1]
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    KV_SETS: gl.constexpr = k_smem.type.shape[0] // 2
    acc_layout: gl.constexpr = wgmma_layout(HEAD)
    s_layout: gl.constexpr = wgmma_layout(TILE_M)
    rows_s = gl.arange(0, TILE_N, layout=gl.SliceLayout(1, s_layout))
    heads = kv_heads * group
    row = Schedule + gl.program_id(0) * max_rounds
    rounds = gl.load(Rounds + gl.program_id(0))
    base = n_q * 0  # ring buffers used by earlier tiles (a run-time value: it is carried by the loop)
    upcoming = gl.load(row)  # each tile's entry is read one tile ahead, off the critical path
    for r in range(rounds):
        tile = upcoming
        upcoming = gl.load(row + gl.minimum(r + 1, rounds - 1))
        batch, kv_head, start_n, lo, mid = _scheduled_tile(tile, num_n, kv_heads, n_q, n_k, causal, TILE_M, TILE_N)
        kv = r % KV_SETS
        k_tile = k_smem.index(2 * kv + WG).reshape([TILE_N, HEAD])
        v_tile = v_smem.index(2 * kv + WG).reshape([TILE_N, HEAD])
        first_key = start_n + WG * TILE_N
        key_pos = first_key + rows_s
        bh0 = batch * heads + kv_head * group
        dk = gl.zeros([TILE_N, HEAD], gl.float32, acc_layout)
        dv = gl.zeros([TILE_N, HEAD], gl.float32, acc_layout)
        steps = gl.cdiv(n_q - lo, TILE_M)
        masked_steps = (mid - lo) // TILE_M
        mbarrier.wait(kv_ready.index(kv), (r // KV_SETS) & 1)
        for g in range(group):
            first = g * steps
            if WG == 1:
                first += skip_unseen_step(base + first, lo, n_q, n_k, first_key, masked_steps, ready, empty,
                                          TILE_M, q_smem.type.shape[0])
            dk, dv = dkdv_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta, first,
                                g * steps + masked_steps, base, lo, n_q, n_k, key_pos, bh0, qk_scale, True, PREFETCH)
            dk, dv = dkdv_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta,
                                g * steps + masked_steps, (g + 1) * steps, base, lo, n_q, n_k, key_pos, bh0, qk_scale,
                                False, PREFETCH)
        base += group * steps
        # Every matmul reading this warpgroup's K/V buffers has completed (each step waits for its
        # own): dK/dV go through them.
        k_buf = k_smem.index(2 * kv + WG)
        v_buf = v_smem.index(2 * kv + WG)
        k_buf.reshape([TILE_N, HEAD]).store((dk * sm_scale).to(k_smem.dtype))
        v_buf.reshape([TILE_N, HEAD]).store(dv.to(v_smem.dtype))
        fence_async_shared()  # the generic-proxy stores, before the copy engine reads them
        tma.async_copy_shared_to_global(dk_desc, [batch, kv_head, first_key, 0], k_buf)
        tma.async_copy_shared_to_global(dv_desc, [batch, kv_head, first_key, 0], v_buf)
        tma.store_wait(0)
        mbarrier.arrive(kv_empty.index(kv), count=1)


@gluon.jit
def _attn_bwd_dkdv_ws_persistent(
    Q, K, V, DO, Lse, Delta, DK, DV, Schedule, Rounds,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    batch, n_q, n_k, kv_heads, GROUP, qk_scale, sm_scale, max_rounds,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    KV_SETS: gl.constexpr, CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    PREFETCH: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    heads = kv_heads * GROUP
    num_n = gl.cdiv(n_k, 2 * BLOCK_N)
    # Four-dimensional descriptors over the whole inputs, made once: a program's tiles span batch
    # entries and heads. The copy engine zero-fills rows past n_q or n_k within each head.
    q_desc = whole_descriptor(Q, batch, heads, n_q, stride_qb, stride_qh, stride_qn, BLOCK_M, HEAD_DIM)
    do_desc = whole_descriptor(DO, batch, heads, n_q, stride_db, stride_dh, stride_dn, BLOCK_M, HEAD_DIM)
    k_desc = whole_descriptor(K, batch, kv_heads, n_k, stride_kb, stride_kh, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = whole_descriptor(V, batch, kv_heads, n_k, stride_vb, stride_vh, stride_vn, BLOCK_N, HEAD_DIM)
    qo_layout: gl.constexpr = q_desc.layout
    kv_layout: gl.constexpr = k_desc.layout

    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM], qo_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM], qo_layout)
    # K/V set s: buffers 2s and 2s + 1 (consumer 0's and consumer 1's keys).
    k_smem = gl.allocate_shared_memory(dtype, [2 * KV_SETS, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2 * KV_SETS, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    kv_ready, kv_empty = buffer_barriers(KV_SETS)
    ready, empty = buffer_barriers(STAGES)

    # dK/dV (contiguous, the inputs' dtype) as the copy engine writes them, from the K/V buffers.
    dk_desc = tma.make_tensor_descriptor(DK, [batch, kv_heads, n_k, HEAD_DIM],
                                         [(kv_heads * n_k).to(gl.int64) * HEAD_DIM, n_k.to(gl.int64) * HEAD_DIM,
                                          HEAD_DIM, 1], [1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    dv_desc = tma.make_tensor_descriptor(DV, [batch, kv_heads, n_k, HEAD_DIM],
                                         [(kv_heads * n_k).to(gl.int64) * HEAD_DIM, n_k.to(gl.int64) * HEAD_DIM,
                                          HEAD_DIM, 1], [1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    args = (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, kv_empty, ready, empty, Lse,
            Delta, Schedule, Rounds, max_rounds, n_q, n_k, kv_heads, GROUP, num_n, CAUSAL, qk_scale, sm_scale, dk_desc,
            dv_desc)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_pbwd_consume, (args, 0, PREFETCH)), (_pbwd_consume, (args, 1, PREFETCH)),
                        (_pbwd_producer, args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
