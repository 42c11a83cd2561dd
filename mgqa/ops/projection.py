"""A linear layer under mixed precision whose weight gradient comes out of its matrix product in float32.

Under autocast, ``F.linear`` on a float32 weight multiplies half-precision copies, so its weight
gradient is a half-precision product that autograd then converts to the weight's float32: one more
pass over every weight gradient each step, and on a GPU a transposing one. ``linear`` computes the
same forward and input gradient, and the weight gradient as a product with a float32 output (the
matrix product's epilogue writes it; ``aten::mm.dtype`` on CUDA): no conversion pass, and the
gradient is no longer rounded to half precision before the optimizer sees it.

Where autocast is off, the weight is not float32, or (on CUDA) this torch lacks the widened
product, it is ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# A half-precision matrix product with a float32 output (aten::mm.dtype, CUDA) is missing from older torch releases.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
HALF = (torch.float16, torch.bfloat16)


def _wide_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of half-precision matrices, accumulated and returned in float32. Off CUDA, where the
    widened product has no kernel, the same sum is taken over float32 copies (exact: half-precision
    values are float32 values)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class _WideGradLinear(torch.autograd.Function):
    """y = x W^T + b in ``dtype`` (the autocast dtype); dW and db in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):  # noqa: ANN001 (autograd signature)
        x_half, w_half = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x_half, w_half)
        ctx.x_dtype = x.dtype
        return F.linear(x_half, w_half, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        x_half, w_half = ctx.saved_tensors
        # A backward run inside an autocast region (on the CPU the engine runs it on the caller's
        # thread) would otherwise narrow the float32 product again.
        with torch.autocast(x_half.device.type, enabled=False):
            grad_out = grad_out.to(w_half.dtype)
            grad_x = (grad_out @ w_half).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
            rows = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
            grad_w = _wide_mm(rows.t(), x_half.reshape(-1, x_half.shape[-1])) if ctx.needs_input_grad[1] else None
            grad_b = rows.sum(0, dtype=torch.float32) if ctx.needs_input_grad[2] else None  # False for no bias
        return grad_x, grad_w, grad_b, None


def widened_grad_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype ``linear`` computes in with a float32 weight gradient, or None where it is
    plain ``F.linear``."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or weight.dtype != torch.float32 or not weight.requires_grad:
        return None
    dtype = torch.get_autocast_dtype(device)
    if dtype not in HALF or (x.is_cuda and not _MM_OUT_DTYPE):
        return None
    return dtype


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; under half-precision autocast with a float32 weight that needs a
    gradient, the weight (and bias) gradient is produced in float32 by the matrix product."""
    dtype = widened_grad_dtype(x, weight)
    if dtype is None:
        return F.linear(x, weight, bias)
    return _WideGradLinear.apply(x, weight, bias, dtype)
