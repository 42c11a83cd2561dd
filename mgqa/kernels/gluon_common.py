"""What the Gluon (warp-specialised, sm_90) kernels share: the register budget of their three
partitions, the layouts of one warpgroup of 4 warps issuing ``wgmma`` with the accumulator in
registers, the tensor descriptors they load through, the query-block program order, the key blocks a
block of query rows needs, and the ring of shared-memory buffers one producer warp fills for two
consumer warpgroups.

Tile sizes are not here: ``plan.py`` chooses them and each launch passes them as constexprs."""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from mgqa.kernels.tl_common import _key_range, _query_block_at, _query_block_program


# Every Gluon kernel here runs 4 warps (consumer 0, the default partition) + 4 (consumer 1) + 1
# producer, rounded up to 12 resident warps: maxnreg 168 x 12 x 32 fills the 64K registers at launch,
# then setmaxnreg moves them from the producer (24) to the two consumers (240 each).
NUM_WARPS = 4
CONSUMER_REGS = 240
PRODUCER_REGS = 24
MAXNREG = 168


@triton.constexpr_function
def wgmma_layout(n):
    """Accumulator layout of one warpgroup's ``wgmma`` producing ``n`` columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@triton.constexpr_function
def register_operand_layout(acc_layout):
    """Layout of a 16-bit A operand held in registers, for a ``wgmma`` with that accumulator layout."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)


@triton.constexpr_function
def _last_two(shape):
    return [shape[-2], shape[-1]]


@gluon.jit
def ring_tile(ring, stage):
    """Buffer ``stage`` of a ring of tiles, as a 2-D (rows, head_dim) tile: rings loaded through
    4-D descriptors hold (1, 1, rows, head_dim) buffers."""
    return ring.index(stage).reshape(_last_two(ring.type.shape))


@gluon.jit
def kv_descriptors(K, V, batch, kv_head, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, n_k,
                   BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    """Tensor descriptors of one KV head's K and V as (n_k, HEAD_DIM) tensors read in (BLOCK_N,
    HEAD_DIM) tiles; the copy engine zero-fills rows past n_k."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], K.dtype.element_ty)
    k_desc = tma.make_tensor_descriptor(K + batch.to(gl.int64) * stride_kb + kv_head.to(gl.int64) * stride_kh,
                                        [n_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM], layout)
    v_desc = tma.make_tensor_descriptor(V + batch.to(gl.int64) * stride_vb + kv_head.to(gl.int64) * stride_vh,
                                        [n_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM], layout)
    return k_desc, v_desc



@gluon.jit
def query_block_program(n_q, heads, GROUP, ROWS: gl.constexpr, CAUSAL: gl.constexpr, SECTION_PROGRAMS,
                        SECTION_CHUNKS):
    """(batch, kv_head, head, first row) of this program on a 1-D grid of ROWS-row query blocks: the
    tl kernels' launch order (tl_common._query_block_program, called from Gluon on scalars),
    sections of a few (batch, KV head) chunks; SECTION_CHUNKS = 1 is the plain (chunk, query block,
    member) order."""
    batch, kv_head, member, first_row = _query_block_program(n_q, heads, GROUP, ROWS, CAUSAL, SECTION_PROGRAMS,
                                                             SECTION_CHUNKS)
    return batch, kv_head, kv_head * GROUP + member, first_row


@gluon.jit
def query_block_at(tile, n_tiles, n_q, heads, GROUP, ROWS: gl.constexpr, CAUSAL: gl.constexpr, SECTION_PROGRAMS,
                   SECTION_CHUNKS):
    """``query_block_program`` for position ``tile`` of the order of ``n_tiles`` query blocks (a
    persistent program walks several)."""
    batch, kv_head, member, first_row = _query_block_at(tile, n_tiles, n_q, heads, GROUP, ROWS, CAUSAL,
                                                        SECTION_PROGRAMS, SECTION_CHUNKS)
    return batch, kv_head, kv_head * GROUP + member, first_row


@gluon.jit
def key_blocks(first_row, rows, n_q, n_k, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(full, count) for query rows [first_row, first_row + rows): the first ``full`` key blocks are
    visible to every row (no mask), and ``count`` blocks hold any key they see (as
    tl_common._key_range, in blocks)."""
    hi_full, hi = _key_range(first_row, n_q, n_k, rows, BLOCK_N, CAUSAL)
    return hi_full // BLOCK_N, gl.cdiv(hi, BLOCK_N)


@gluon.jit
def whole_descriptor(X, batch, heads, n_rows, stride_b, stride_h, stride_n, BLOCK: gl.constexpr,
                     HEAD_DIM: gl.constexpr):
    """Tensor descriptor of all of a (batch, heads, n_rows, HEAD_DIM) tensor, read in (1, 1, BLOCK,
    HEAD_DIM) tiles (a persistent program's tiles span batch entries and heads); the copy engine
    zero-fills rows past n_rows within each head."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK, HEAD_DIM], X.dtype.element_ty)
    return tma.make_tensor_descriptor(X, [batch, heads, n_rows, HEAD_DIM], [stride_b, stride_h, stride_n, 1],
                                      [1, 1, BLOCK, HEAD_DIM], layout)


@gluon.jit
def head_rows_descriptor(X, batch, head, stride_b, stride_h, stride_n, n_rows, BLOCK: gl.constexpr,
                         HEAD_DIM: gl.constexpr):
    """Tensor descriptor of one head's (n_rows, HEAD_DIM) rows read in (BLOCK, HEAD_DIM) tiles; the
    copy engine zero-fills rows past the end."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK, HEAD_DIM], X.dtype.element_ty)
    return tma.make_tensor_descriptor(X + batch.to(gl.int64) * stride_b + head.to(gl.int64) * stride_h,
                                      [n_rows, HEAD_DIM], [stride_n, 1], [BLOCK, HEAD_DIM], layout)


@gluon.jit
def buffer_barriers(STAGES: gl.constexpr):
    """(ready, empty) mbarriers of a ring of STAGES buffers that one producer fills (ready: the copy
    engine's arrival) and both consumer warpgroups release (empty: one arrival each)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return ready, empty


@gluon.jit
def kv_ring(k_desc, v_desc, STAGES: gl.constexpr):
    """Shared memory of a query-block kernel after its query-side tiles, in this order: STAGES K and
    V tiles, one barrier for the query-side loads, and the ring's (ready, empty) barriers."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    tiles_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(tiles_bar, count=1)
    kv_ready, kv_empty = buffer_barriers(STAGES)
    return k_smem, v_smem, tiles_bar, kv_ready, kv_empty


@gluon.jit
def stream_kv(k_desc, v_desc, k_smem, v_smem, kv_ready, kv_empty, n_blocks):
    """Producer loop: K/V blocks 0..n_blocks-1 into the ring of buffers, each refilled once both
    consumers have released it."""
    TILE_N: gl.constexpr = k_smem.type.shape[1]
    NSTAGES: gl.constexpr = k_smem.type.shape[0]
    for j in range(n_blocks):
        stage = j % NSTAGES
        # A fresh mbarrier counts as having completed the phase before its first.
        mbarrier.wait(kv_empty.index(stage), ((j // NSTAGES) & 1) ^ 1)
        bar = kv_ready.index(stage)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [j * TILE_N, 0], bar, k_smem.index(stage))
        tma.async_copy_global_to_shared(v_desc, [j * TILE_N, 0], bar, v_smem.index(stage))
