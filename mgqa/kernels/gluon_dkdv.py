"""Warp-specialised attention dK/dV kernel for Hopper (sm_90), written in Gluon: the forward's
structure (``gluon_fwd``) applied to the backward's key-block loop.

It computes what ``tl_dkdv._attn_bwd_dkdv`` does: dK (scaled by ``sm_scale``) and dV of k, v
(B, Hkv, Nk, D), summed over every query row of every query head in the KV head's group, from q and
dO (B, H, Nq, D), the forward's lse (log2 units, +inf for rows that see no key) and the dQ pass's
delta; written in the inputs' dtype. Deterministic: no atomics, each key's dK/dV summed in one
program's registers (with group splits, in float32 partials summed in a fixed order). Rows past the
end read zeros and lse = +inf, so P = 0 for them.

A program owns ``2 * BLOCK_N`` keys of one KV head (a key tile):

- a one-warp *producer* loads the tile's K/V, then streams each step's Q and dO tiles (``BLOCK_M``
  query rows of one head) through ``STAGES`` shared-memory buffers;
- two *consumer* warpgroups each own ``BLOCK_N`` keys. Per step a consumer issues Sᵀ = K Qᵀ and
  dPᵀ = V dOᵀ together, computes Pᵀ while dPᵀ runs, issues dV += Pᵀ dO, computes dSᵀ = Pᵀ (dPᵀ -
  delta) while that runs, issues dK += dSᵀ Q, then releases the buffers. Under a causal mask the
  second consumer skips the one step per head whose scores are all masked for its keys
  (``skip_unseen_step``).

``launch`` runs the plan's kernel: ``_attn_bwd_dkdv_ws`` here, one program per key tile and group
split in the tl kernels' sectioned launch order, or the persistent one (``gluon_dkdv_persistent``,
one program per SM over host-made tile lists), which shares this module's step functions.

Only for head_dim 128 in fp16/bf16 (``plan.py`` decides). Gluon has no CPU interpreter: CPU CI
compiles the kernels for sm_90 (``compile_check``) and the GPU suite checks them.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from mgqa.kernels.gluon_common import (
    CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS, buffer_barriers, kv_descriptors, register_operand_layout,
    wgmma_layout,
)
from mgqa.kernels.plan import PassPlan
from mgqa.kernels.tl_common import _key_block_at


@gluon.jit
def _key_tile(tile, num_n, n_chunks, kv_heads, SECTION_PROGRAMS, SECTION_CHUNKS):
    """(batch, KV head, chunk, key block) at position ``tile`` of tl_common._key_block_program's
    launch order: sections of a few chunks (a chunk: one (batch, KV head, group split)) whose Q/dO
    share L2, ordered (key block, chunk) within a section, so under a causal mask the first key
    blocks, which see the most queries, start first across the section. With one chunk per section:
    (chunk, key block)."""
    chunk, pid_n = _key_block_at(tile, num_n, n_chunks, SECTION_PROGRAMS, SECTION_CHUNKS)
    return chunk // kv_heads, chunk % kv_heads, chunk, pid_n


@gluon.jit
def query_range(start_n, n_q, n_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, causal):
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
def _step_rows(t, steps, lo, TILE_M: gl.constexpr):
    """(head within the group, first query row) of step t: each head's ``steps`` steps from lo on."""
    g = t // steps
    return g, lo + (t - g * steps) * TILE_M


@gluon.jit
def _bwd_producer(args):
    q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, Lse, Delta, \
        start_n, lo, mid, n_q, n_k, head0, group, bh0, qk_scale, sm_scale, out_row0 = args
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
    for t in range(group * steps):
        g, start_m = _step_rows(t, steps, lo, TILE_M)
        stage = t % NSTAGES
        # A fresh mbarrier counts as having completed the phase before its first.
        mbarrier.wait(empty.index(stage), ((t // NSTAGES) & 1) ^ 1)
        bar = ready.index(stage)
        mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [head0 + g, start_m, 0], bar, q_smem.index(stage))
        tma.async_copy_global_to_shared(do_desc, [head0 + g, start_m, 0], bar, do_smem.index(stage))


@gluon.jit
def _row_stats(Lse, Delta, t, last, steps, lo, n_q, bh0, offs, TILE_M: gl.constexpr):
    """lse and delta of step t's query rows (+inf and 0 past n_q, or if t is past the last step)."""
    g, start_m = _step_rows(t, steps, lo, TILE_M)
    rows = start_m + offs
    ok = (rows < n_q) & (t < last)
    base = (bh0 + g).to(gl.int64) * n_q
    lse = gl.load(Lse + base + rows, mask=ok, other=float("inf"))
    delta = gl.load(Delta + base + rows, mask=ok, other=0.0)
    return lse, delta


@gluon.jit
def dkdv_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta, first, last, base, lo, n_q, n_k,
               key_pos, bh0, qk_scale, MASKED: gl.constexpr, PREFETCH: gl.constexpr):
    """Steps t in [first, last) of one key tile's flat (head, query block) sequence, added into one
    consumer's (dk, dv); step t reads ring buffer number base + t (base: the steps of the program's
    earlier tiles). PREFETCH: each step's lse and delta are loaded one step ahead."""
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
    lse_v, delta_v = _row_stats(Lse, Delta, first, last, steps, lo, n_q, bh0, offs_v, TILE_M)
    for t in range(first, last):
        g, start_m = _step_rows(t, steps, lo, TILE_M)
        stage = (base + t) % NSTAGES
        offs_m = start_m + offs_m0
        if PREFETCH:
            lse = gl.convert_layout(lse_v, col_s)
            delta = gl.convert_layout(delta_v, col_s)
            lse_v, delta_v = _row_stats(Lse, Delta, t + 1, last, steps, lo, n_q, bh0, offs_v, TILE_M)
        else:
            lse, delta = _row_stats(Lse, Delta, t, last, steps, lo, n_q, bh0, offs_m0, TILE_M)
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
        dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        mbarrier.arrive(empty.index(stage), count=1)  # one thread; the matmuls reading it are done
    return dk, dv


@gluon.jit
def skip_unseen_step(t, lo, n_q, n_k, first_key, masked_steps, ready, empty, TILE_M: gl.constexpr,
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
def _bwd_consume(args, WG: gl.constexpr, PREFETCH: gl.constexpr):
    """Consumer warpgroup WG's partition; ``args`` is the producer's argument tuple."""
    _, _, _, _, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, Lse, Delta, start_n, lo, mid, n_q, \
        n_k, _, group, bh0, qk_scale, sm_scale, out_row0 = args
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
            first += skip_unseen_step(first, lo, n_q, n_k, first_key, masked_steps, ready, empty, TILE_M,
                                      q_smem.type.shape[0])
        dk, dv = dkdv_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta, first,
                            g * steps + masked_steps, 0, lo, n_q, n_k, key_pos, bh0, qk_scale, True, PREFETCH)
        dk, dv = dkdv_steps(dk, dv, k_tile, v_tile, q_smem, do_smem, ready, empty, Lse, Delta,
                            g * steps + masked_steps, (g + 1) * steps, 0, lo, n_q, n_k, key_pos, bh0, qk_scale, False,
                            PREFETCH)
    keys = first_key + gl.arange(0, TILE_N, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, acc_layout))
    offs = (out_row0 + keys).to(gl.int64)[:, None] * HEAD + offs_d[None, :]
    key_ok = (keys < n_k)[:, None]
    gl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=key_ok)


@gluon.jit
def _attn_bwd_dkdv_ws(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dn,
    n_q, n_k, kv_heads, GROUP, qk_scale, sm_scale, SECTION_PROGRAMS, SECTION_CHUNKS,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CAUSAL: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, PREFETCH: gl.constexpr,
    SPLITS: gl.constexpr,
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

    lo, mid = query_range(start_n, n_q, n_k, BLOCK_M, BLOCK_N, CAUSAL)

    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], qo_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_DIM], qo_layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], v_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    ready, empty = buffer_barriers(STAGES)

    out_row0 = pid_bkv.to(gl.int64) * n_k
    args = (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_bar, ready, empty, DK, DV, Lse,
            Delta, start_n, lo, mid, n_q, n_k, head0, GROUP // SPLITS, bh0, qk_scale, sm_scale, out_row0)
    # Constexprs reach a partition only inside a tuple written in the call (an assigned tuple turns
    # them into run-time values).
    gl.warp_specialize([(_bwd_consume, (args, 0, PREFETCH)), (_bwd_consume, (args, 1, PREFETCH)),
                        (_bwd_producer, (args,))], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def launch(q, k, v, grad_out, lse, delta, dk, dv, causal: bool, qk_scale: float, sm_scale: float, p: PassPlan,
           schedule=None, rounds=None) -> None:
    """Run the dK/dV pass: q, grad_out (B, H, Nq, 128) and k, v (B, Hkv, Nk, 128) with unit last stride
    and 16-byte aligned rows; lse, delta (B, H, Nq) float32; dk, dv (B, Hkv, Nk, 128) contiguous, in
    the inputs' dtype, are written. ``p`` is the plan's dK/dV pass:

    - kernel "gluon": one program per key tile and group split, ``p.splits`` programs per key tile
      each summing 1/splits of the group (into float32 partials, summed here in a fixed order, when
      splits > 1); launch-order sections ``p.walk``;
    - kernel "gluon_persistent": ``p.programs`` programs; program i takes key tiles
      ``schedule[i, :rounds[i]]`` (schedule (programs, max_rounds), rounds (programs,), int32 on q's
      device, from ``plan.dkdv_schedule``: each entry ``chunk * num_n + key tile``, chunk = batch *
      Hkv + KV head).

    Tiles from ``p.tiles``: block_m, block_n, num_stages, prefetch and (persistent) kv_sets. The
    caller has set Triton's allocator: the in-kernel tensor descriptors need global scratch."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    tiles = p.tiles
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
               v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    common = dict(HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, STAGES=tiles.num_stages,
                  CAUSAL=causal, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, PREFETCH=tiles.prefetch,
                  num_warps=NUM_WARPS, maxnreg=MAXNREG)
    if p.kernel == "gluon_persistent":
        # Imported here: the persistent kernel imports this module's step functions.
        from mgqa.kernels.gluon_dkdv_persistent import _attn_bwd_dkdv_ws_persistent  # noqa: PLC0415

        _attn_bwd_dkdv_ws_persistent[(p.programs,)](
            q, k, v, grad_out, lse, delta, dk, dv, schedule, rounds, *strides, batch, n_q, n_k, kv_heads,
            heads // kv_heads, qk_scale, sm_scale, schedule.shape[1], KV_SETS=tiles.kv_sets, **common,
        )
        return
    splits = p.splits
    dk_out, dv_out = dk, dv
    if splits > 1:
        dk_out = torch.empty((batch, kv_heads, splits, n_k, head_dim), dtype=torch.float32, device=q.device)
        dv_out = torch.empty_like(dk_out)
    n_tiles = batch * kv_heads * triton.cdiv(n_k, 2 * tiles.block_n)
    _attn_bwd_dkdv_ws[(n_tiles * splits,)](
        q, k, v, grad_out, lse, delta, dk_out, dv_out, *strides, n_q, n_k, kv_heads, heads // kv_heads, qk_scale,
        sm_scale, p.walk.programs, p.walk.chunks, SPLITS=splits, **common,
    )
    if splits > 1:  # a fixed-order sum: deterministic
        dk.copy_(dk_out.sum(dim=2))
        dv.copy_(dv_out.sum(dim=2))
