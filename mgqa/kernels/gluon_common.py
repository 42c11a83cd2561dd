"""What the Gluon (warp-specialised, sm_90) kernels share: the layouts of one warpgroup of 4 warps
issuing ``wgmma`` with the accumulator in registers, and the K/V tensor descriptors."""

from __future__ import annotations

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma


@triton.constexpr_function
def wgmma_layout(n):
    """Accumulator layout of one warpgroup's ``wgmma`` producing ``n`` columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@triton.constexpr_function
def register_operand_layout(acc_layout):
    """Layout of a 16-bit A operand held in registers, for a ``wgmma`` with that accumulator layout."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)


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
