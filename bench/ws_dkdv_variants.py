"""Backward-only timing of the warp-specialised Gluon dK/dV kernel's settings against the tl one.

    python bench/ws_dkdv_variants.py [--rounds 5] [--json bench/results/ws_dkdv_variants.json]

Times ``attention_backward`` (the dQ kernel, then dK/dV) per variant: ``tl`` (the tl dK/dV kernel)
and ``ws_s{STAGES}_p{PREFETCH}`` (the Gluon kernel with that many Q/dO buffers, lse/delta loaded one
step ahead or not, for both masks; ``attention_bwd_ws.SETTINGS`` holds the pick per mask). Rounds
over all variants, the order reversed every other round; the median is reported as backward TFLOP/s (2.5 x the forward's 4*B*H*N^2*D, halved under a causal mask). Every
variant's dq, dk, dv are checked against the tl backward's. H100 (sm_90) only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mgqa.kernels import attention as kernels  # noqa: E402

TOKENS, HEADS = 16384, 32
SHAPES = [(128, 8, 4096, True), (128, 8, 4096, False), (128, 8, 8192, True), (128, 8, 8192, False),
          (128, 8, 16384, True), (128, 32, 4096, True)]
VARIANTS = ["tl", "ws_s3_p0", "ws_s3_p1", "ws_s4_p0", "ws_s4_p1"]


def configure(name: str) -> None:
    ws = kernels._gluon_module("attention_bwd_ws")
    kernels.BWD_IMPL = "tl" if name == "tl" else "auto"
    if name != "tl":
        setting = (int(name.split("_s")[1][0]), name.endswith("p1"))
        ws.SETTINGS = {False: setting, True: setting}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="ws_dkdv_variants.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=TOKENS, heads=HEADS, dtype="bfloat16",
                units="backward TFLOP/s, 2.5 x 4*B*H*N^2*D (x0.5 causal)", rounds=args.rounds)
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, bf16, backward TFLOP/s "
          f"(median of {args.rounds})")
    ws = kernels._gluon_module("attention_bwd_ws")
    defaults = dict(ws.SETTINGS)
    rows = []
    for head_dim, kv_heads, n, causal in SHAPES:
        batch = TOKENS // n
        gen = dict(device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, HEADS, n, head_dim, **gen)
        k = torch.randn(batch, kv_heads, n, head_dim, **gen)
        v = torch.randn(batch, kv_heads, n, head_dim, **gen)
        grad_out = torch.randn_like(q)
        scale = head_dim ** -0.5
        out, lse = kernels.attention_forward(q, k, v, causal, scale)
        flops = 2.5 * 4 * batch * HEADS * n * n * head_dim * (0.5 if causal else 1.0)
        row = dict(D=head_dim, Hkv=kv_heads, N=n, causal=causal)
        readings = {name: [] for name in VARIANTS}
        configure("tl")
        ref = kernels.attention_backward(grad_out, q, k, v, out, lse, causal, scale)
        for name in VARIANTS:
            configure(name)
            grads = kernels.attention_backward(grad_out, q, k, v, out, lse, causal, scale)
            row[f"{name}_err"] = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                     for a, b in zip(grads, ref))
        for r in range(args.rounds):
            for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                configure(name)
                ms = triton.testing.do_bench(
                    lambda: kernels.attention_backward(grad_out, q, k, v, out, lse, causal, scale), warmup=10, rep=50)
                readings[name].append(flops / ms / 1e9)
        for name in VARIANTS:
            values = sorted(readings[name])
            row[name] = values[len(values) // 2]
            row[f"{name}_readings"] = values
        rows.append(row)
        print(f"D={head_dim} Hkv={kv_heads} N={n} causal={int(causal)}: " + " ".join(
            f"{name}={row[name]:.0f} (err {row[name + '_err']:.1e})" for name in VARIANTS), flush=True)
    ws = kernels._gluon_module("attention_bwd_ws")
    ws.SETTINGS = defaults
    kernels.BWD_IMPL = "auto"
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
