"""CPU time to enqueue each part of mgqa's attention call, on one CUDA GPU: the whole forward+backward,
the autograd and custom-op layers, the launchers, each Gluon kernel launch and each dispatch check
(bench/host_overhead.py measures the whole call against the peers; this says where its host time
goes). Each part runs while the GPU is busy with a long sleep, so nothing waits for the GPU.

    python bench/host_parts.py --json bench/results/host_parts.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import cuda_missing, int_list  # noqa: E402
from bench.host_overhead import enqueue_us  # noqa: E402
from mgqa.kernels import attention as A  # noqa: E402
from mgqa.kernels.attention import _gluon_module  # noqa: E402


class _Passthrough(torch.autograd.Function):
    """Identity whose backward first runs ``body``: what a call costs on autograd's backward thread."""

    @staticmethod
    def forward(ctx, x, body):
        ctx.body = body
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.body()
        return grad, None


def parts(batch, heads, kv_heads, n, causal=True):
    gen = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, heads, n, 128, **gen, requires_grad=True)
    k = torch.randn(batch, kv_heads, n, 128, **gen, requires_grad=True)
    v = torch.randn(batch, kv_heads, n, 128, **gen, requires_grad=True)
    do = torch.randn(batch, heads, n, 128, **gen)
    scale = 1 / math.sqrt(128)
    out, lse = A.attention_forward(q, k, v, causal, scale)
    fwd_ws, dq_ws, bwd_ws = (_gluon_module(name) for name in ("attention_fwd_ws", "attention_dq_ws", "attention_bwd_ws"))
    o2, l2, dq, dk, dv, delta = (torch.empty_like(t) for t in (out, lse, q, k, v, lse))
    qk_scale = scale * math.log2(math.e)
    group_bytes = 2 * heads // kv_heads * n * 128 * 2
    sections = A._sections("dkdv", causal, group_bytes, q.device)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        A.triton_attention(q, k, v, causal=causal).backward(do)

    def fwd_no_grad():
        with torch.no_grad():
            return A.triton_attention(q, k, v, causal=causal)

    x = torch.zeros(8, device="cuda", requires_grad=True)
    grad_x = torch.ones(8, device="cuda")

    def on_backward_thread(body):
        def run():
            x.grad = None
            _Passthrough.apply(x, body).backward(grad_x)
        return run

    return {
        "forward+backward (triton_attention, .backward)": fwd_bwd,
        "autograd backward of an identity (engine alone)": on_backward_thread(lambda: None),
        "... with attention_backward inside": on_backward_thread(
            lambda: A.attention_backward(do, q, k, v, out, lse, causal, scale)),
        "triton_attention forward": lambda: A.triton_attention(q, k, v, causal=causal),
        "triton_attention forward, no_grad": fwd_no_grad,
        "mgqa::gqa_attention_fwd custom op": lambda: A._fwd_op(q, k, v, causal, scale),
        "attention_forward launcher": lambda: A.attention_forward(q, k, v, causal, scale),
        "attention_backward launcher": lambda: A.attention_backward(do, q, k, v, out, lse, causal, scale),
        "Gluon forward launch": lambda: fwd_ws.launch(q, k, v, o2, l2, causal, qk_scale),
        "Gluon dQ launch": lambda: dq_ws.launch(q, k, v, do, out, lse, delta, dq, causal, qk_scale, scale),
        "Gluon dK/dV launch": lambda: bwd_ws.launch(q, k, v, do, lse, delta, dk, dv, causal, qk_scale, scale,
                                                    sections),
        "ws_forward_reason": lambda: A.ws_forward_reason(q, k, v, causal, scale),
        "ws_dq_reason": lambda: A.ws_dq_reason(q, k, v, do),
        "_ws_backward_plan": lambda: A._ws_backward_plan(q, k, v, do),
        "_tma_ok(q, k, v)": lambda: A._tma_ok(q, k, v),
        "torch.cuda.get_device_capability": lambda: torch.cuda.get_device_capability(q.device),
        "_sections": lambda: A._sections("dkdv", causal, group_bytes, q.device),
        "torch.empty (B, H, N, D)": lambda: torch.empty(q.shape, device="cuda", dtype=torch.bfloat16),
        "SDPA flash forward (for scale)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,1024", help="sequence lengths (batch = 16384 // N; H=32, Hkv=8)")
    parser.add_argument("--json", default="host_parts.json", help="where to write the results")
    args = parser.parse_args()
    lengths = int_list(parser, "lengths", args.lengths)
    if cuda_missing("bench/host_parts.py"):
        return 2
    rows = []
    for n in lengths:
        for name, fn in parts(16384 // n, 32, 8, n).items():
            us = enqueue_us(fn, 50)
            rows.append(dict(N=n, part=name, enqueue_us=us))
            print(f"N={n:5d} {name:48s} {us:8.1f} µs", flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), causal=True, dtype="bfloat16", head_dim=128)
    Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
