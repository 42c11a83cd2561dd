"""Layouts shared by the Gluon (warp-specialised, sm_90) kernels: one warpgroup of 4 warps issuing
``wgmma`` with the accumulator in registers."""

from __future__ import annotations

import triton
from triton.experimental.gluon import language as gl


@triton.constexpr_function
def wgmma_layout(n):
    """Accumulator layout of one warpgroup's ``wgmma`` producing ``n`` columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@triton.constexpr_function
def register_operand_layout(acc_layout):
    """Layout of a 16-bit A operand held in registers, for a ``wgmma`` with that accumulator layout."""
    return gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
