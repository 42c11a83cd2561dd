"""Warp-specialised dK/dV kernel for Hopper (sm_90), written in Gluon; the forward's structure
(``attention_fwd_ws``) applied to the backward's key-block loop.

One program owns ``2 * BLOCK_N`` keys of one KV head and walks every query block of every query head
in its group (deterministic: no atomics, dK/dV summed in registers):

- a one-warp *producer* loads the program's K/V tiles, then streams each step's Q and dO tiles
  through ``STAGES`` shared-memory buffers;
- two *consumer* warpgroups each own ``BLOCK_N`` keys. Per step (``BLOCK_M`` queries) a consumer
  issues Sᵀ = K Qᵀ and dPᵀ = V dOᵀ together, computes Pᵀ while dPᵀ runs, issues dV += Pᵀ dO, computes
  dSᵀ = Pᵀ (dPᵀ - delta) while that runs, issues dK += dSᵀ Q, then releases the buffers. Under a
  causal mask the second consumer skips the one step per head whose scores are all masked for its
  keys (``_skip_unseen_step``).

Same contract as ``attention_bwd._attn_bwd_dkdv`` with one group split: lse in log2 units (+inf for
rows that see no key), delta from the dQ kernel, dK scaled by ``sm_scale``, dK/dV written in the
inputs' dtype. Rows past the end read zeros and lse = +inf, so P = 0 for them. The launch order is
the tl kernel's sectioned one (``attention_common._key_block_program``).

The launcher (``attention.attention_backward``) takes it for head_dim 128 in fp16/bf16 on sm_90 when
there are at least two programs per SM, splitting the query group over up to
``attention.WS_BWD_MAX_SPLITS`` programs to get there (further under a causal mask; ``unsupported_reason``,
``group_splits``, ``attention.ws_backward_reason``), and its persistent variant below for MHA; dQ comes from the Gluon dQ kernel (``attention_dq_ws``). Gluon has no CPU interpreter: CPU CI compiles the kernel for
sm_90 (tests/kernels/test_compile.py) and the GPU suite checks it against the tl backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

from mgqa.kernels import gluon_common
from mgqa.kernels.gluon_common import CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS  # noqa: F401 (launch settings)
from mgqa.kernels.gluon_common import (  # noqa: F401 (first_free_schedule: also this module's)
    buffer_barriers, cached, first_free_schedule, kv_descriptors, register_operand_layout, schedule_tensors,
    wgmma_layout, whole_descriptor,
)

BLOCK_M = 64  # queries per step
BLOCK_N = 64  # keys per consumer warpgroup (a program owns 2 * BLOCK_N)
# (Q/dO buffers, lse/delta loaded one step ahead) per causal flag, the fastest pair that
# bench/ws_dkdv_variants.py found (bench/NOTES.md). 4 buffers: 4 x 32 KB + 64 KB of K/V. Under a
# causal mask the look-ahead costs more registers than it saves, so it spills more.
SETTINGS = {False: (4, True), True: (3, False)}
# The same with dQ computed too (``launch(dq_acc=...)``): 64 KB more shared memory (the dS buffers and
# each warpgroup's dQ tile on its way to the reductions), so 3 Q/dO buffers; no look-ahead (it spills).
FUSED_SETTINGS = {False: (3, False), True: (3, False)}
HEAD_DIMS = (128,)


def unsupported_reason(head_dim: int, dtype_name: str, capability: tuple[int, int]) -> Optional[str]:
    """None if this kernel runs the case, else why the ``tl`` dK/dV kernel is used."""
    return gluon_common.unsupported_reason(head_dim, dtype_name, capability, HEAD_DIMS)


@gluon.jit
def _key_tile(tile, num_n, n_chunks, kv_heads, SECTION_PROGRAMS, SECTION_CHUNKS):
    """(batch, KV head, chunk, key block) at position ``tile`` of the launch order of
    attention_common._key_block_program (one group split): sections of a few (batch, KV head)
    chunks whose Q/dO share L2, ordered (key block, chunk) within a section, so under a causal mask
    the first key blocks, which see the most queries, start first across the section. With one chunk
    per section: (chunk, key block)."""
    section = gl.maximum(gl.minimum(gl.cdiv(SECTION_PROGRAMS, num_n), SECTION_CHUNKS), 1)
    first = tile // (section * num_n) * section
    within = tile - first * num_n
    count = gl.minimum(section, n_chunks - first)
    chunk = first + within % count
    return chunk // kv_heads, chunk % kv_heads, chunk, within // count


@gluon.jit
def _query_range(start_n, n_q, n_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, causal):
    """(lo, mid) for the keys [start_n, start_n + 2 * BLOCK_N): queries before lo see none of them;
    [lo, mid) straddle the diagonal (masked). Without a mask, (0, 0)."""
    lo = n_q * 0  # a run-time zero: ``causal`` may be a run-time value (inside a partition)
    mid = lo
    if causal:
        offset = n_k - n_q
        lo = gl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        mid = gl.minimum(gl.maximum(start_n + 2 * BLOCK_N - offset, 0), n_q)
        mid = gl.maximum(gl.cdiv(mid, BLOCK_M) * BLOCK_M, lo)
    return lo, mid


@gluon.jit
def _rotation(steps, lo, mid, start_n, n_k, TILE_M: gl.constexpr, TILE_N: gl.constexpr):
    """(masked steps, unmasked steps, rotation) of the key tile at start_n, for ``_step_rows``: the
    unmasked steps start at one that depends on the key tile, so that the programs of one KV head,
    which run at the same time, add their dQ into different rows."""
    masked = (mid - lo) // TILE_M
    free = gl.maximum(steps - masked, 1)
    return masked, free, start_n // (2 * TILE_N) * free // gl.cdiv(n_k, 2 * TILE_N)


@gluon.jit
def _step_rows(t, steps, lo, order, TILE_M: gl.constexpr):
    """(head within the group, first query row) of step t: each head's steps from lo on, in order,
    or with ``order`` = ``_rotation(...)``, the masked steps (straddling the diagonal) first, then the
    unmasked ones from the rotation's on, wrapping."""
    g = t // steps
    j = t - g * steps
    if len(order) > 0:
        masked, free, rot = order
        j = gl.where(j >= masked, masked + (j - masked + rot) % free, j)
    return g, lo + j * TILE_M


@gluon.jit
def _bwd_producer(args, DQ: gl.constexpr):
    q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, Lse, Delta, \
        start_n, lo, mid, n_q, n_k, head0, group, bh0, qk_scale, sm_scale, out_row0, fused = args
    # Tile sizes come from the buffers: the shared argument tuple is assigned, which makes any
    # constexpr in it a run-time value.
    TILE_M: gl.constexpr = q_smem.type.shape[2]
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    NSTAGES: gl.constexpr = q_smem.type.shape[0]
    mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [start_n, 0], kv_bar, k_smem.index(0))
    tma.async_copy_global_to_shared(k_desc, [start_n + TILE_N, 0], kv_bar, k_smem.index(1))
    tma.async_copy_global_to_shared(v_desc, [start_n, 0], kv_bar, v_smem.index(0))
    tma.async_copy_global_to_shared(v_desc, [start_n + TILE_N, 0], kv_bar, v_smem.index(1))
    steps = gl.cdiv(n_q - lo, TILE_M)
    if DQ:
        order = _rotation(steps, lo, mid, start_n, n_k, TILE_M, TILE_N)
    else:
        order = ()
    for t in range(group * steps):
        g, start_m = _step_rows(t, steps, lo, order, TILE_M)
        stage = t % NSTAGES
        # A fresh mbarrier counts as having completed the phase before its first.
        mbarrier.wait(empty.index(stage), ((t // NSTAGES) & 1) ^ 1)
        bar = ready.index(stage)
        mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [head0 + g, start_m, 0], bar, q_smem.index(stage))
        tma.async_copy_global_to_shared(do_desc, [head0 + g, start_m, 0], bar, do_smem.index(stage))


# sm_90's vector reduction, four consecutive floats per instruction (relaxed, no result). With
# pack=4: outputs $0-$3 (unused), the four addresses $4-$7 (consecutive: the first is used), the
# values $8-$11.
RED_V4_ASM = gl.constexpr("red.global.gpu.relaxed.add.v4.f32 [$4], {$8, $9, $10, $11};\n"
                          "mov.u32 $0, 0;\nmov.u32 $1, 0;\nmov.u32 $2, 0;\nmov.u32 $3, 0;")


@gluon.jit
def _row_stats(Lse, Delta, t, last, steps, lo, n_q, bh0, offs, TILE_M: gl.constexpr, order):
    """lse and delta of step t's query rows (+inf and 0 past n_q, or if t is past the last step);
    ``order``: that of ``_step_rows``."""
    g, start_m = _step_rows(t, steps, lo, order, TILE_M)
    rows = start_m + offs
    ok = (rows < n_q) & (t < last)
    base = (bh0 + g).to(gl.int64) * n_q
    lse = gl.load(Lse + base + rows, mask=ok, other=float("inf"))
    delta = gl.load(Delta + base + rows, mask=ok, other=0.0)
    return lse, delta


@gluon.jit
def _bwd_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta, first, last, base, lo, n_q, n_k,
               key_pos, bh0, qk_scale, MASKED: gl.constexpr, PREFETCH: gl.constexpr, fused, WG: gl.constexpr,
               DQ: gl.constexpr):
    """Steps t in [first, last) of one key tile's flat (head, query block) sequence; step t reads
    ring buffer number base + t (base: the steps of the program's earlier tiles).

    DQ: also add each step's dQ contribution into a float32 buffer (``fused`` = (dS buffers, their
    barriers, both consumers' K tiles, DQ_ACC, its rows per head)). Both consumers store their dSᵀ
    (keys x queries) into one buffer, wait for each other on its barrier, then consumer WG computes
    dS K for the step's queries and its half of head_dim, over the program's 2 * TILE_N keys, and
    adds it into DQ_ACC with float32 vector reductions (relaxed ``red``: the summation order varies)."""
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    HEAD: gl.constexpr = q_smem.type.shape[-1]
    TILE_N: gl.constexpr = k_tile.type.shape[0]
    NSTAGES: gl.constexpr = q_smem.type.shape[0]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = wgmma_layout(TILE_M)
    acc_layout: gl.constexpr = dk.type.layout
    op_layout: gl.constexpr = register_operand_layout(acc_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    # lse and delta of the next step are loaded one step ahead, one value per thread, and spread to
    # the matmul layout when used, so their global-load latency hides under a step's matmuls.
    vec: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    zero_s = gl.zeros([TILE_N, TILE_M], gl.float32, s_layout)
    offs_m0 = gl.arange(0, TILE_M, layout=col_s)
    offs_v = gl.arange(0, TILE_M, layout=vec)
    steps = gl.cdiv(n_q - lo, TILE_M)
    offset = n_k - n_q
    if DQ:
        order = fused[5]
    else:
        order = ()
    lse_v, delta_v = _row_stats(Lse, Delta, first, last, steps, lo, n_q, bh0, offs_v, TILE_M, order)
    for t in range(first, last):
        g, start_m = _step_rows(t, steps, lo, order, TILE_M)
        stage = (base + t) % NSTAGES
        offs_m = start_m + offs_m0
        if PREFETCH:
            lse = gl.convert_layout(lse_v, col_s)
            delta = gl.convert_layout(delta_v, col_s)
            lse_v, delta_v = _row_stats(Lse, Delta, t + 1, last, steps, lo, n_q, bh0, offs_v, TILE_M, order)
        else:
            lse, delta = _row_stats(Lse, Delta, t, last, steps, lo, n_q, bh0, offs_m0, TILE_M, order)
        mbarrier.wait(ready.index(stage), ((base + t) // NSTAGES) & 1)
        q_tile = q_smem.index(stage).reshape([TILE_M, HEAD])
        do_tile = do_smem.index(stage).reshape([TILE_M, HEAD])
        s_t = warpgroup_mma(k_tile, q_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp_t = warpgroup_mma(v_tile, do_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(1, deps=(s_t,))  # Sᵀ ready; dPᵀ may still run
        p_t = gl.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            p_t = gl.where(key_pos[:, None] <= offs_m[None, :] + offset, p_t, 0.0)
        p_op = gl.convert_layout(p_t.to(dtype), op_layout)
        dv = warpgroup_mma(p_op, do_tile, dv, is_async=True)
        dp_t = warpgroup_mma_wait(1, deps=(dp_t,))  # dPᵀ ready; dV += Pᵀ dO may still run
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        ds_op = gl.convert_layout(ds_t, op_layout)
        dk = warpgroup_mma(ds_op, q_tile, dk, is_async=True)
        if DQ:
            ds_smem, ds_bar, k_all, DQ_ACC, rows_per_head, _, dq_smem = fused
            HALF: gl.constexpr = HEAD // 2
            dq_layout: gl.constexpr = wgmma_layout(HALF)
            use = base + t
            ds_buf = ds_smem.index(use % 2)
            ds_buf.slice(WG * TILE_N, TILE_N, dim=0).store(ds_t)
            fence_async_shared()  # the generic-proxy stores, before wgmma reads them
            mbarrier.arrive(ds_bar.index(use % 2), count=1)  # after a barrier of this warpgroup
            # dV and dK first: their register operands are then free while dQ runs, and the step's
            # Q/dO buffer (which dQ does not read) goes back to the producer.
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            mbarrier.arrive(empty.index(stage), count=1)
            mbarrier.wait(ds_bar.index(use % 2), (use // 2) & 1)  # the other consumer's keys stored too
            zero_dq = gl.zeros([TILE_M, HALF], gl.float32, dq_layout)
            dq = warpgroup_mma(ds_buf.slice(0, TILE_N, dim=0).permute((1, 0)),
                               k_all.index(0).slice(WG * HALF, HALF, dim=1), zero_dq, use_acc=False, is_async=True)
            dq = warpgroup_mma(ds_buf.slice(TILE_N, TILE_N, dim=0).permute((1, 0)),
                               k_all.index(1).slice(WG * HALF, HALF, dim=1), dq, is_async=True)
            dq = warpgroup_mma_wait(0, deps=(dq,))
            # Through this warpgroup's shared buffer, 16 rows at a time, 4 consecutive floats per
            # thread: few registers at once (the whole tile and its 32 addresses spill). Rows past
            # n_q land in the buffer's padding (rows_per_head is a multiple of TILE_M).
            dq_buf = dq_smem.index(WG)
            dq_buf.store(dq)
            red_layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])
            CHUNK: gl.constexpr = 16
            row0 = (bh0 + g).to(gl.int64) * rows_per_head + start_m
            cols = WG * HALF + gl.arange(0, HALF, gl.SliceLayout(0, red_layout))
            for c in gl.static_range(TILE_M // CHUNK):
                vals = dq_buf.slice(c * CHUNK, CHUNK, dim=0).load(red_layout)
                rows = row0 + c * CHUNK + gl.arange(0, CHUNK, gl.SliceLayout(1, red_layout))
                ptrs = (DQ_ACC + rows[:, None] * HEAD + cols[None, :]).to(gl.int64, bitcast=True)
                gl.inline_asm_elementwise(RED_V4_ASM, "=r,=r,=r,=r,l,l,l,l,r,r,r,r", [ptrs, vals], gl.int32,
                                          is_pure=False, pack=4)
        else:
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            mbarrier.arrive(empty.index(stage), count=1)  # one thread; the matmuls reading it are done
    return dk, dv


@gluon.jit
def _skip_unseen_step(t, lo, n_q, n_k, first_key, masked_steps, ready, empty, TILE_M: gl.constexpr,
                      NSTAGES: gl.constexpr):
    """1 if the first masked step (t, query rows lo to lo + TILE_M) sees none of a consumer's keys
    (from first_key on) under the causal mask, after taking its ring buffer and handing it back
    unread; else 0. Only the second consumer's first masked step of each head can be so: the matmuls
    of a step whose every score is masked would only add zeros."""
    skip = (masked_steps > 0) & (lo + (TILE_M - 1) + (n_k - n_q) < first_key)
    if skip:
        stage = t % NSTAGES
        mbarrier.wait(ready.index(stage), (t // NSTAGES) & 1)
        mbarrier.arrive(empty.index(stage), count=1)
    return skip.to(gl.int32)


@gluon.jit
def _bwd_consume(args, WG: gl.constexpr, PREFETCH: gl.constexpr, DQ: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple."""
    _, _, _, _, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, Lse, Delta, start_n, lo, mid, n_q, \
        n_k, _, group, bh0, qk_scale, sm_scale, out_row0, fused = args
    TILE_M: gl.constexpr = q_smem.type.shape[2]
    HEAD: gl.constexpr = q_smem.type.shape[3]
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    acc_layout: gl.constexpr = wgmma_layout(HEAD)
    s_layout: gl.constexpr = wgmma_layout(TILE_M)
    k_tile = k_smem.index(WG)
    v_tile = v_smem.index(WG)
    first_key = start_n + WG * TILE_N
    key_pos = first_key + gl.arange(0, TILE_N, layout=gl.SliceLayout(1, s_layout))
    dk = gl.zeros([TILE_N, HEAD], gl.float32, acc_layout)
    dv = gl.zeros([TILE_N, HEAD], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)
    steps = gl.cdiv(n_q - lo, TILE_M)
    masked_steps = (mid - lo) // TILE_M
    for g in range(group):
        first = g * steps
        if WG == 1:
            if not DQ:  # with dQ both consumers meet on every step's dS
                first += _skip_unseen_step(first, lo, n_q, n_k, first_key, masked_steps, ready, empty, TILE_M,
                                           q_smem.type.shape[0])
        dk, dv = _bwd_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta, first,
                            g * steps + masked_steps, 0, lo, n_q, n_k, key_pos, bh0, qk_scale, True, PREFETCH,
                            fused, WG, DQ)
        dk, dv = _bwd_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta,
                            g * steps + masked_steps, (g + 1) * steps, 0, lo, n_q, n_k, key_pos, bh0, qk_scale, False,
                            PREFETCH, fused, WG, DQ)
    keys = first_key + gl.arange(0, TILE_N, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, acc_layout))
    offs = (out_row0 + keys).to(gl.int64)[:, None] * HEAD + offs_d[None, :]
    key_ok = (keys < n_k)[:, None]
    gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=key_ok)


@gluon.jit
def _attn_bwd_dkdv_ws(
    Q, K, V, DO, Lse, Delta, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    n_q, n_k, kv_heads, GROUP, qk_scale, sm_scale, SECTION_PROGRAMS, SECTION_CHUNKS, dq_rows,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PREFETCH: gl.constexpr,
    SPLITS: gl.constexpr = 1, DQ: gl.constexpr = False,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    # A chunk is one (batch, KV head, group split); with SPLITS > 1, DK/DV are float32 partials
    # (B, Hkv, SPLITS, Nk, D) that the launcher sums.
    num_n = gl.cdiv(n_k, 2 * BLOCK_N)
    batch, sub, pid_bkv, pid_n = _key_tile(gl.program_id(0), num_n, gl.num_programs(0) // num_n,
                                           kv_heads * SPLITS, SECTION_PROGRAMS, SECTION_CHUNKS)
    kv_head = sub // SPLITS
    start_n = pid_n * (2 * BLOCK_N)
    heads = kv_heads * GROUP
    head0 = kv_head * GROUP + (sub % SPLITS) * (GROUP // SPLITS)
    bh0 = batch * heads + head0

    qo_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, BLOCK_M, HEAD_DIM], dtype)
    # Q and dO: one (heads, rows, head_dim) descriptor per batch entry; the copy engine zero-fills
    # rows past n_q within each head.
    q_desc = tma.make_tensor_descriptor(Q + batch.to(gl.int64) * stride_qb, [heads, n_q, HEAD_DIM],
                                        [stride_qh, stride_qn, 1], [1, BLOCK_M, HEAD_DIM], qo_layout)
    do_desc = tma.make_tensor_descriptor(DO + batch.to(gl.int64) * stride_db, [heads, n_q, HEAD_DIM],
                                         [stride_dh, stride_dn, 1], [1, BLOCK_M, HEAD_DIM], qo_layout)
    k_desc, v_desc = kv_descriptors(K, V, batch, kv_head, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                                    stride_vn, n_k, BLOCK_N, HEAD_DIM)

    lo, mid = _query_range(start_n, n_q, n_k, BLOCK_M, BLOCK_N, CAUSAL)

    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], qo_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], qo_layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    ready, empty = buffer_barriers(STAGES)
    if DQ:
        # Two buffers of both consumers' dSᵀ (2 * BLOCK_N keys x BLOCK_M queries), each with a barrier
        # both consumers arrive on once their half is stored.
        ds_smem = gl.allocate_shared_memory(dtype, [2, 2 * BLOCK_N, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([2 * BLOCK_N, BLOCK_M], dtype))
        ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_bar.index(i), count=2)
        order = _rotation(gl.cdiv(n_q - lo, BLOCK_M), lo, mid, start_n, n_k, BLOCK_M, BLOCK_N)
        dq_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_DIM // 2],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM // 2], gl.float32))
        fused = (ds_smem, ds_bar, k_smem, DQ_ACC, dq_rows, order, dq_smem)
    else:
        fused = (DQ_ACC, dq_rows)

    out_row0 = pid_bkv.to(gl.int64) * n_k
    args = (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, Lse,
            Delta, start_n, lo, mid, n_q, n_k, head0, GROUP // SPLITS, bh0, qk_scale, sm_scale, out_row0, fused)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_bwd_consume, (args, 0, PREFETCH, DQ)), (_bwd_consume, (args, 1, PREFETCH, DQ)),
                        (_bwd_producer, (args, DQ))], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# The persistent variant (the default for MHA, where the per-tile set-up it hides is largest): one program per SM
# walks a list of key tiles made on the host (``persistent_schedule``): every tile, in the launch
# order above, goes to the program that frees up first, as the hardware would start one-tile
# programs, so the tiles running at once stay neighbours in that order (sharing Q/dO in L2) and
# the programs finish together. The producer streams one tile's Q/dO after another through the same
# ring and loads a tile's K/V while the consumers finish the tile before, into a second K/V buffer
# set where shared memory has room. (Q/dO buffers, lse/delta look-ahead, K/V buffer sets) per causal
# flag: 3 x 32 KB + 2 x 64 KB causal, 4 x 32 KB + 64 KB non-causal.
PERSISTENT_SETTINGS = {False: (4, True, 1), True: (3, False, 2)}
MAX_PROGRAMS: Optional[int] = None  # programs of the persistent launch (default: one per SM); tests lower it
# A tile's set-up (K/V load, first Q/dO, dK/dV stores) in query steps, for the schedule's cost model.
TILE_SETUP_STEPS = 2
_schedules: dict = {}  # launch parameters -> (schedule, rounds) on the device, the newest MAX_SCHEDULES
MAX_SCHEDULES = 64


def launch_order(num_n: int, n_chunks: int, section_programs: int, section_chunks: int) -> list[tuple[int, int]]:
    """(chunk, key block) of each launch-order position: ``_key_tile`` (and the tl kernels'
    attention_common._key_block_program with one group split) on the host."""
    section = max(min(-(-section_programs // num_n), section_chunks), 1)
    order = []
    for tile in range(num_n * n_chunks):
        first = tile // (section * num_n) * section
        within = tile - first * num_n
        count = min(section, n_chunks - first)
        order.append((first + within % count, within // count))
    return order


def tile_steps(pid_n: int, n_q: int, n_k: int, causal: bool) -> int:
    """Query steps of one head for the key tile ``pid_n`` (``_query_range``'s lo on the host)."""
    lo = max(pid_n * 2 * BLOCK_N - (n_k - n_q), 0) // BLOCK_M * BLOCK_M if causal else 0
    return -(-(n_q - lo) // BLOCK_M)


def persistent_schedule(batch: int, kv_heads: int, n_q: int, n_k: int, group: int, causal: bool, programs: int,
                        sections: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(schedule, rounds) of a persistent launch, cached per launch parameters: program p takes
    tiles ``schedule[p, :rounds[p]]``, each ``chunk * num_n + key block`` (int32, on ``device``)."""
    key = (batch, kv_heads, n_q, n_k, group, bool(causal), programs, sections["SECTION_PROGRAMS"],
           sections["SECTION_CHUNKS"], str(device))

    def build():
        num_n = triton.cdiv(n_k, 2 * BLOCK_N)
        order = launch_order(num_n, batch * kv_heads, sections["SECTION_PROGRAMS"], sections["SECTION_CHUNKS"])
        costs = [group * tile_steps(pid_n, n_q, n_k, causal) + TILE_SETUP_STEPS for _, pid_n in order]
        table, rounds = schedule_tensors(first_free_schedule(costs, programs),
                                         [chunk * num_n + pid_n for chunk, pid_n in order])
        return table.to(device), rounds.to(device)

    return cached(_schedules, key, build, MAX_SCHEDULES)


@gluon.jit
def _scheduled_tile(tile, num_n, kv_heads, n_q, n_k, causal, TILE_M: gl.constexpr, TILE_N: gl.constexpr):
    """(batch, KV head, chunk, first key, lo, mid) of schedule entry ``tile``."""
    chunk = tile // num_n
    start_n = (tile - chunk * num_n) * (2 * TILE_N)
    lo, mid = _query_range(start_n, n_q, n_k, TILE_M, TILE_N, causal)
    return chunk // kv_heads, chunk % kv_heads, chunk, start_n, lo, mid


@gluon.jit
def _pbwd_producer(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, kv_empty, ready,
                   empty, DK, DV, Lse, Delta, Schedule, Rounds, max_rounds, n_q, n_k, kv_heads, group, num_n, causal,
                   qk_scale, sm_scale, out_descs):
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    NSTAGES: gl.constexpr = q_smem.type.shape[0]
    KV_SETS: gl.constexpr = k_smem.type.shape[0] // 2
    row = Schedule + gl.program_id(0) * max_rounds
    base = n_q * 0  # ring buffers used by earlier tiles (a run-time value: it is carried by the loop)
    for r in range(gl.load(Rounds + gl.program_id(0))):
        batch, kv_head, chunk, start_n, lo, mid = _scheduled_tile(gl.load(row + r), num_n, kv_heads, n_q, n_k,
                                                                  causal, TILE_M, TILE_N)
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
def _pbwd_consume(args, WG: gl.constexpr, PREFETCH: gl.constexpr, TMA_STORE: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple (and, last, the
    dK/dV descriptors). TMA_STORE: dK/dV leave through this warpgroup's own K/V buffers of the
    tile, by the copy engine, instead of from registers; the buffers go back to the producer once
    the copy engine has read them."""
    _, _, _, _, q_smem, do_smem, k_smem, v_smem, kv_ready, kv_empty, ready, empty, DK, DV, Lse, Delta, Schedule, \
        Rounds, max_rounds, n_q, n_k, kv_heads, group, num_n, causal, qk_scale, sm_scale, out_descs = args
    TILE_M: gl.constexpr = q_smem.type.shape[-2]
    HEAD: gl.constexpr = q_smem.type.shape[-1]
    TILE_N: gl.constexpr = k_smem.type.shape[-2]
    KV_SETS: gl.constexpr = k_smem.type.shape[0] // 2
    acc_layout: gl.constexpr = wgmma_layout(HEAD)
    s_layout: gl.constexpr = wgmma_layout(TILE_M)
    rows_s = gl.arange(0, TILE_N, layout=gl.SliceLayout(1, s_layout))
    rows_acc = gl.arange(0, TILE_N, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, acc_layout))
    heads = kv_heads * group
    row = Schedule + gl.program_id(0) * max_rounds
    rounds = gl.load(Rounds + gl.program_id(0))
    base = n_q * 0  # ring buffers used by earlier tiles (a run-time value: it is carried by the loop)
    upcoming = gl.load(row)  # each tile's entry is read one tile ahead, off the critical path
    for r in range(rounds):
        tile = upcoming
        upcoming = gl.load(row + gl.minimum(r + 1, rounds - 1))
        batch, kv_head, chunk, start_n, lo, mid = _scheduled_tile(tile, num_n, kv_heads, n_q, n_k, causal, TILE_M,
                                                                  TILE_N)
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
                first += _skip_unseen_step(base + first, lo, n_q, n_k, first_key, masked_steps, ready, empty,
                                           TILE_M, q_smem.type.shape[0])
            dk, dv = _bwd_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta, first,
                                g * steps + masked_steps, base, lo, n_q, n_k, key_pos, bh0, qk_scale, True, PREFETCH,
                                (), WG, False)
            dk, dv = _bwd_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta,
                                g * steps + masked_steps, (g + 1) * steps, base, lo, n_q, n_k, key_pos, bh0, qk_scale,
                                False, PREFETCH, (), WG, False)
        base += group * steps
        if TMA_STORE:
            # Every matmul reading this warpgroup's K/V buffers has completed (each step waits for
            # its own): dK/dV go through them. The copy engine clips keys past n_k.
            dk_desc, dv_desc = out_descs
            k_buf = k_smem.index(2 * kv + WG)
            v_buf = v_smem.index(2 * kv + WG)
            k_buf.reshape([TILE_N, HEAD]).store((dk * sm_scale).to(k_smem.dtype))
            v_buf.reshape([TILE_N, HEAD]).store(dv.to(v_smem.dtype))
            fence_async_shared()  # the generic-proxy stores, before the copy engine reads them
            tma.async_copy_shared_to_global(dk_desc, [batch, kv_head, first_key, 0], k_buf)
            tma.async_copy_shared_to_global(dv_desc, [batch, kv_head, first_key, 0], v_buf)
            tma.store_wait(0)
            mbarrier.arrive(kv_empty.index(kv), count=1)
        else:
            # Every matmul reading this K/V set has completed (each step waits for its own): the
            # producer may refill it while this warpgroup stores dK/dV.
            mbarrier.arrive(kv_empty.index(kv), count=1)
            keys = first_key + rows_acc
            offs = (chunk.to(gl.int64) * n_k + keys)[:, None] * HEAD + offs_d[None, :]
            key_ok = (keys < n_k)[:, None]
            gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
            gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=key_ok)


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
    PREFETCH: gl.constexpr, TMA_STORE: gl.constexpr = False,
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

    if TMA_STORE:  # dK/dV (contiguous, the inputs' dtype) as the copy engine writes them
        dk_desc = tma.make_tensor_descriptor(DK, [batch, kv_heads, n_k, HEAD_DIM],
                                             [(kv_heads * n_k).to(gl.int64) * HEAD_DIM, n_k.to(gl.int64) * HEAD_DIM, HEAD_DIM, 1],
                                             [1, 1, BLOCK_N, HEAD_DIM], kv_layout)
        dv_desc = tma.make_tensor_descriptor(DV, [batch, kv_heads, n_k, HEAD_DIM],
                                             [(kv_heads * n_k).to(gl.int64) * HEAD_DIM, n_k.to(gl.int64) * HEAD_DIM, HEAD_DIM, 1],
                                             [1, 1, BLOCK_N, HEAD_DIM], kv_layout)
        out_descs = (dk_desc, dv_desc)
    else:
        out_descs = ()
    args = (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, kv_empty, ready, empty, DK,
            DV, Lse, Delta, Schedule, Rounds, max_rounds, n_q, n_k, kv_heads, GROUP, num_n, CAUSAL, qk_scale, sm_scale,
            out_descs)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_pbwd_consume, (args, 0, PREFETCH, TMA_STORE)),
                        (_pbwd_consume, (args, 1, PREFETCH, TMA_STORE)),
                        (_pbwd_producer, args)], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

def group_splits(batch: int, kv_heads: int, n_k: int, group: int, min_programs: int, max_splits: int) -> int:
    """The fewest group splits (a power of two dividing ``group``, at most ``max_splits``) that give
    ``min_programs`` key-tile programs; 0 if none does."""
    splits = 1
    while batch * kv_heads * splits * triton.cdiv(n_k, 2 * BLOCK_N) < min_programs:
        if splits * 2 > max_splits or group % (splits * 2):
            return 0
        splits *= 2
    return splits


def launch(q, k, v, grad_out, lse, delta, dk, dv, causal: bool, qk_scale: float, sm_scale: float,
           sections: dict, persistent: bool = False, splits: int = 1, dq_acc: Optional[torch.Tensor] = None,
           tma_store: bool = False) -> None:
    """q, grad_out (B, H, Nq, 128) and k, v (B, Hkv, Nk, 128) with unit last stride and 16-byte
    aligned rows; lse, delta (B, H, Nq) float32; dk, dv (B, Hkv, Nk, 128) contiguous; ``sections``
    the SECTION_PROGRAMS and SECTION_CHUNKS of the launch order; ``persistent``: one program per SM
    (``_attn_bwd_dkdv_ws_persistent``) instead of one per key tile; ``splits``: programs per
    (batch, KV head, key tile), each summing over its share of the group into a float32 partial
    (``group_splits``; not with ``persistent``); ``dq_acc``: a zeroed float32 (B, H, rows, 128) buffer,
    rows a multiple of BLOCK_M and at least Nq, into which the kernel also adds dS K (unscaled dQ,
    atomics; not with ``persistent``); ``tma_store``: the persistent kernel writes dK/dV by the copy
    engine. The caller has set Triton's allocator (in-kernel descriptors need
    global scratch)."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    tiles = batch * kv_heads * triton.cdiv(n_k, 2 * BLOCK_N)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
               v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    common = dict(HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, CONSUMER_REGS=CONSUMER_REGS,
                  PRODUCER_REGS=PRODUCER_REGS, num_warps=NUM_WARPS, maxnreg=MAXNREG)
    if persistent:
        if splits != 1 or dq_acc is not None:
            raise ValueError(f"splits={splits}, dq_acc={'given' if dq_acc is not None else None}: the persistent "
                             "dK/dV kernel neither splits the query group nor computes dQ")
        stages, prefetch, kv_sets = PERSISTENT_SETTINGS[bool(causal)]
        programs = min(tiles, MAX_PROGRAMS or torch.cuda.get_device_properties(q.device).multi_processor_count)
        schedule, rounds = persistent_schedule(batch, kv_heads, n_q, n_k, heads // kv_heads, causal, programs,
                                               sections, q.device)
        _attn_bwd_dkdv_ws_persistent[(programs,)](
            q, k, v, grad_out, lse, delta, dk, dv, schedule, rounds, *strides, batch, n_q, n_k, kv_heads,
            heads // kv_heads, qk_scale, sm_scale, schedule.shape[1], STAGES=stages, KV_SETS=kv_sets,
            PREFETCH=prefetch, TMA_STORE=tma_store, **common,
        )
        return
    stages, prefetch = SETTINGS[bool(causal)]
    dk_out, dv_out = dk, dv
    if splits > 1:
        dk_out = torch.empty((batch, kv_heads, splits, n_k, head_dim), dtype=torch.float32, device=q.device)
        dv_out = torch.empty_like(dk_out)
    if dq_acc is not None:
        if dq_acc.dtype != torch.float32 or dq_acc.shape[:2] != q.shape[:2] or dq_acc.shape[3] != head_dim \
                or dq_acc.shape[2] < n_q or dq_acc.shape[2] % BLOCK_M or not dq_acc.is_contiguous():
            raise ValueError(f"dq_acc {tuple(dq_acc.shape)} {dq_acc.dtype}: expected a contiguous float32 "
                             f"({batch}, {heads}, rows, {head_dim}) buffer, rows >= {n_q} and a multiple of {BLOCK_M}")
        stages, prefetch = FUSED_SETTINGS[bool(causal)]
    _attn_bwd_dkdv_ws[(tiles * splits,)](
        q, k, v, grad_out, lse, delta, dk_out, dv_out, delta if dq_acc is None else dq_acc, *strides, n_q, n_k,
        kv_heads, heads // kv_heads, qk_scale, sm_scale, sections["SECTION_PROGRAMS"], sections["SECTION_CHUNKS"],
        0 if dq_acc is None else dq_acc.shape[2], STAGES=stages, PREFETCH=prefetch, SPLITS=splits,
        DQ=dq_acc is not None, **common,
    )
    if splits > 1:  # a fixed-order sum: deterministic
        dk.copy_(dk_out.sum(dim=2))
        dv.copy_(dv_out.sum(dim=2))
