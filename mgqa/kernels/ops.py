"""Grouped-query attention in Triton: the entry point, the ``mgqa::`` custom ops and autograd.

``triton_attention(q, k, v, causal=..., scale=..., options=...)`` is what ``mgqa.ops.attention``
calls for the "triton" backend. q is (B, H, Nq, D), k and v are (B, Hkv, Nk, D) with H % Hkv == 0;
query head h reads KV head h // (H / Hkv) by index. Causal masks align bottom-right (query i at
absolute position Nk - Nq + i); rows that see no key output 0. Any strides are accepted as long as
the last dimension is contiguous (other layouts are copied once). fp16 and bf16 use the tensor
cores with fp32 accumulation; fp32 inputs run with IEEE fp32 dots (exact but slow, meant for tests).
The backward is deterministic: bit-identical results run to run.

The forward and backward are ``torch.library.custom_op``s with fake registrations, so the op traces
under ``torch.compile(fullgraph=True)``; eager calls run the same launchers through a plain
``torch.autograd.Function``, whose dispatch costs the host far less per call.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from mgqa.kernels import launch
from mgqa.kernels.checks import check
from mgqa.kernels.plan import AttentionPlan, KernelOptions

_default = KernelOptions()


def configure(**fields) -> KernelOptions:
    """Set the process's default ``KernelOptions`` field by field (``configure(autotune=False)``);
    returns the new default. Calls that pass ``options=`` ignore it."""
    global _default
    try:
        _default = dataclasses.replace(_default, **fields)
    except TypeError as err:
        names = ", ".join(f.name for f in dataclasses.fields(KernelOptions))
        raise ValueError(f"configure({', '.join(fields)}): unknown option ({err}); options are {names}") from None
    return _default


def default_options() -> KernelOptions:
    return _default


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels address rows by stride but read each row as one contiguous vector.
    return t if t.stride(-1) == 1 else t.contiguous()


def plan_for_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: Optional[float] = None,
                    options: Optional[KernelOptions] = None) -> AttentionPlan:
    """The plan a ``triton_attention`` call on these inputs carries out in its forward pass."""
    check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return launch.plan_for(q, k, bool(causal), scale, options or _default, v)


def _forward(q, k, v, causal, scale, options):
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return launch.forward(q, k, v, causal, scale, launch.plan_for(q, k, causal, scale, options, v))


def _backward(grad_out, q, k, v, out, lse, causal, scale, options):
    # The saved q, k, v are the caller's tensors, not the forward's contiguous copies.
    grad_out, q, k, v = (_last_dim_contiguous(t) for t in (grad_out, q, k, v))
    plan = launch.plan_for(q, k, causal, scale, options, v, grad_out)
    return launch.backward(grad_out, q, k, v, out, lse, causal, scale, plan)


@torch.library.custom_op("mgqa::gqa_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, autotune: bool,
            gluon: bool, tma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale, KernelOptions(autotune, gluon, tma))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, causal, scale, autotune, gluon, tma):
    batch, heads, n_q, head_dim = q.shape
    return q.new_empty((batch, heads, n_q, head_dim)), q.new_empty((batch, heads, n_q), dtype=torch.float32)


@torch.library.custom_op("mgqa::gqa_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, causal: bool, scale: float, autotune: bool, gluon: bool,
            tma: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad_out, q, k, v, out, lse, causal, scale, KernelOptions(autotune, gluon, tma))


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, out, lse, causal, scale, autotune, gluon, tma):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, autotune, gluon, tma = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.options = causal, scale, (autotune, gluon, tma)
    ctx.mark_non_differentiable(lse)


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():  # create_graph=True: the kernels' gradients are not differentiable
        raise RuntimeError("triton attention: gradients of gradients (create_graph=True) are not supported; "
                           "use backend='sdpa' or 'reference' for double backward")


def _op_backward(ctx, grad_out, _grad_lse):
    _refuse_double_backward()
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, *ctx.options)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The custom ops' launchers for eager mode: a custom op's dispatch costs far more host time per
    forward+backward, which at short sequences is longer than the kernels and leaves the GPU waiting."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, options):
        out, lse = _forward(q, k, v, causal, scale, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.options = causal, scale, options
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _refuse_double_backward()
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, ctx.options)
        return dq, dk, dv, None, None, None


def run_checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: Optional[float],
                options: Optional[KernelOptions] = None) -> torch.Tensor:
    """``triton_attention`` for inputs already checked (``checks.unsupported_reason`` is None)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    options = options or _default
    if torch.compiler.is_compiling():  # traced: the custom op, which torch.compile sees through
        return _fwd_op(q, k, v, bool(causal), scale, options.autotune, options.gluon, options.tma)[0]
    return _EagerAttention.apply(q, k, v, bool(causal), scale, options)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: Optional[float] = None,
                     options: Optional[KernelOptions] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with grouped KV heads; differentiable in q, k and v.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D), H % Hkv == 0, D in (32, 64, 96, 128, 256), fp16/bf16
    (fp32 accepted, slow). ``scale`` defaults to 1/sqrt(D). ``options``: ``KernelOptions`` for this
    call (default: the process's, ``configure``). Returns (B, H, Nq, D) in q's dtype. Raises
    ValueError naming the offending value for inputs the kernels cannot run.
    """
    check(q, k, v)
    return run_checked(q, k, v, causal, scale, options)
