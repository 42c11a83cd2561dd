"""Shared by the attention kernel tests: random inputs, plans run forward and backward, and the
comparison with the float64 reference (error <= K_SLACK x PyTorch's own error in the same dtype +
ATOL, both measured against float64)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from mgqa.kernels import launch
from mgqa.kernels.plan import AttentionPlan, KernelOptions, plan_attention
from mgqa.ops.reference import reference_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Relative-error slack over PyTorch's own error in the same dtype, and a floor for near-exact cases.
K_SLACK = 4.0
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAX_ERRORS: dict[str, float] = {}


def record_error(key: str, err: float) -> None:
    """Keep the largest relative error per (label, tensor); written out when MGQA_ATTN_ERROR_REPORT
    names a file (nothing is written otherwise)."""
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), err)
    path = os.environ.get("MGQA_ATTN_ERROR_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(MAX_ERRORS, f, indent=1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double()
    assert torch.isfinite(x).all(), "non-finite values in result"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype, layout="contiguous"):
    """Fresh random q (B, H, Nq, D), k, v (B, Hkv, Nk, D), requiring grad; "strided" gives the
    model's views, "last_dim_strided" a q and v whose last dimension is not contiguous."""
    gen = dict(dtype=dtype, device=DEVICE)
    if layout == "strided":
        # Projections produce (B, N, heads, D) and transpose; K and V are slices of one fused tensor.
        q = torch.randn(batch, n_q, heads, head_dim, **gen).transpose(1, 2)
        kv = torch.randn(batch, n_k, 2 * kv_heads, head_dim, **gen).transpose(1, 2)
        k, v = kv[:, :kv_heads], kv[:, kv_heads:]
    elif layout == "last_dim_strided":
        q = torch.randn(batch, heads, n_q, 2 * head_dim, **gen)[..., ::2]
        k = torch.randn(batch, kv_heads, n_k, head_dim, **gen)
        v = torch.randn(batch, kv_heads, head_dim, n_k, **gen).transpose(2, 3)
    else:
        q = torch.randn(batch, heads, n_q, head_dim, **gen)
        k = torch.randn(batch, kv_heads, n_k, head_dim, **gen)
        v = torch.randn(batch, kv_heads, n_k, head_dim, **gen)
    return [t.requires_grad_() for t in (q, k, v)]


def forward_backward(fn, q, k, v, grad_out, **kw):
    """(out, dq, dk, dv) of ``fn(q, k, v, **kw)`` through autograd."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


def default_plan(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float,
                 options: KernelOptions = KernelOptions(autotune=False)) -> AttentionPlan:
    """The plan ``plan_attention`` makes for these tensors on their device (tiles fixed, not
    autotuned); tests ``.replace(...)`` passes of it to force a variant."""
    batch, heads, n_q, head_dim = q.shape
    return plan_attention(batch, heads, k.shape[1], n_q, k.shape[2], head_dim, str(q.dtype).removeprefix("torch."),
                          causal, scale, launch.device_props(q.device), options,
                          layout_ok=launch.layout_ok(q, k), gluon_reason=launch.gluon_reason() if CUDA else None)


def run_plan(plan: AttentionPlan, q, k, v, grad_out, *, causal: bool, scale: Optional[float] = None):
    """(out, dq, dk, dv) of ``plan`` carried out by the launchers (inputs made last-dim contiguous,
    as the entry point does)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, grad_out = (t.detach() if t.stride(-1) == 1 else t.detach().contiguous() for t in (q, k, v, grad_out))
    out, lse = launch.forward(q, k, v, causal, scale, plan)
    return (out, *launch.backward(grad_out, q, k, v, out, lse, causal, scale, plan))


def check_against_reference(q, k, v, causal, scale=None, fn=None, plan: Optional[AttentionPlan] = None,
                            label=None, oracle=torch.float64):
    """out, dq, dk, dv of ``fn`` (default: ``triton_attention``), or of ``plan`` run by the
    launchers, within K_SLACK x PyTorch's error in the same dtype + ATOL of the ``oracle`` reference."""
    from mgqa.kernels import triton_attention

    dtype = q.dtype
    grad_out = torch.randn(q.shape, dtype=dtype, device=q.device)
    if oracle == torch.float64:
        ref = forward_backward(reference_attention, *(t.double() for t in (q, k, v)), grad_out.double(),
                               causal=causal, scale=scale, upcast=torch.float64)
    else:  # at long lengths: float32 upcast is far more precise than the half-precision kernels
        ref = [r.double() for r in forward_backward(reference_attention, q, k, v, grad_out, causal=causal,
                                                    scale=scale, upcast=oracle)]
    same = forward_backward(reference_attention, q, k, v, grad_out, causal=causal, scale=scale, upcast=dtype)
    if plan is not None:
        mine = run_plan(plan, q, k, v, grad_out, causal=causal, scale=scale)
    else:
        mine = forward_backward(fn or triton_attention, q, k, v, grad_out, causal=causal, scale=scale)
    assert mine[0].shape == q.shape and mine[0].dtype == dtype
    assert mine[1].shape == q.shape and mine[2].shape == k.shape and mine[3].shape == v.shape
    for name, x, t, r in zip(("out", "dq", "dk", "dv"), mine, same, ref):
        err, err_torch = rel_err(x, r), rel_err(t, r)
        record_error(f"{label or dtype}:{name}", err)
        assert err <= K_SLACK * err_torch + ATOL[dtype], f"{name}: rel err {err:.2e} vs torch {err_torch:.2e}"
    return mine
