"""Causal launch orders compared: mgqa's kernels with the sectioned order in some kernels against
the plain grid order.

Every variant runs the same kernels and configs; only which program takes which block differs
(``MGQA_TRITON_CAUSAL_ORDER`` and ``SECTION_KERNELS``, mgqa/kernels/attention.py). Differences of a
few percent are below the spread of single readings, so the forward and the backward are timed in
rounds over all variants, the order of the variants reversed every other round, and the median and
spread of each variant's readings are reported, with its ratio to the grid order. Checks that every
variant gives bit-identical results. Prints a table and writes JSON.

    python bench/launch_order.py --rounds 8 --json bench/results/launch_order.json

FLOPs as in bench/attention.py: forward 4*B*H*N^2*D (halved when causal), backward 2.5x, both 3.5x
(forward+backward here: from the two medians).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics

import torch
import triton

from mgqa.kernels import attention as K

TOKENS = 16384
HEADS = 32
SHAPES = [(128, 8, 4096), (128, 8, 8192), (128, 8, 16384), (128, 1, 4096), (128, 32, 4096), (64, 8, 4096)]
# name: the kernels that take the sectioned order
VARIANTS = {"grid": (), "dkdv": ("dkdv",), "bwd": ("dq", "dkdv"), "all": ("fwd", "dq", "dkdv")}


def set_variant(name: str) -> None:
    K.CAUSAL_ORDER = "grid" if name == "grid" else "sections"
    K.SECTION_KERNELS = VARIANTS[name]


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def bench_shape(head_dim: int, kv_heads: int, n: int, rounds: int) -> dict:
    batch = TOKENS // n
    gen = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HEADS, n, head_dim, **gen)
    k = torch.randn(batch, kv_heads, n, head_dim, **gen)
    v = torch.randn(batch, kv_heads, n, head_dim, **gen)
    do = torch.randn(batch, HEADS, n, head_dim, **gen)
    scale = 1.0 / math.sqrt(head_dim)
    flops = 4 * batch * HEADS * n * n * head_dim * 0.5
    results = {}
    for name in VARIANTS:  # autotune (shared by all) and check that all give the same result
        set_variant(name)
        out, lse = K.attention_forward(q, k, v, True, scale)
        results[name] = (out, lse, *K.attention_backward(do, q, k, v, out, lse, True, scale))
    same = all(torch.equal(a, b) for name in VARIANTS for a, b in zip(results[name], results["grid"]))
    phases = {
        "fwd": (1.0, lambda: K.attention_forward(q, k, v, True, scale)),
        "bwd": (2.5, lambda: K.attention_backward(do, q, k, v, out, lse, True, scale)),
    }
    readings = {(name, p): [] for name in VARIANTS for p in phases}
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # drift hits every variant alike
            set_variant(name)
            for phase, (mult, fn) in phases.items():
                readings[(name, phase)].append(mult * flops / time_ms(fn) / 1e9)
    set_variant("dkdv")
    row = dict(B=batch, H=HEADS, Hkv=kv_heads, N=n, D=head_dim, causal=True, identical_results=same)
    for (name, phase), values in readings.items():
        row[f"{name}_{phase}"] = statistics.median(values)
        row[f"{name}_{phase}_readings"] = sorted(values)
    for name in VARIANTS:
        # forward+backward from the two medians: 3.5 units of work over the summed times
        row[f"{name}_fwdbwd"] = 3.5 / (1.0 / row[f"{name}_fwd"] + 2.5 / row[f"{name}_bwd"])
        for phase in ("fwd", "bwd", "fwdbwd"):
            row[f"ratio_{name}_{phase}"] = row[f"{name}_{phase}"] / row[f"grid_{phase}"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds per shape (each order timed once per round)")
    parser.add_argument("--json", default="launch_order.json", help="where to write the results")
    args = parser.parse_args()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=TOKENS, heads=HEADS, dtype="bfloat16", causal=True,
                rounds=args.rounds, units="TFLOP/s (median of the rounds)", variants=VARIANTS)
    rows = []
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, bf16, causal, TFLOP/s, "
          f"median of {args.rounds} rounds; variant = kernels in the sectioned order")
    print(f"{'D':>4} {'Hkv':>4} {'N':>6} {'variant':>8} | {'fwd':>5} {'bwd':>5} {'f+b':>5} | "
          f"{'x grid fwd/bwd/f+b':>20} | same")
    for head_dim, kv_heads, n in SHAPES:
        r = bench_shape(head_dim, kv_heads, n, args.rounds)
        rows.append(r)
        for name in VARIANTS:
            vals = " ".join(f"{r[f'{name}_{p}']:5.0f}" for p in ("fwd", "bwd", "fwdbwd"))
            ratios = "/".join(f"{r[f'ratio_{name}_{p}']:.3f}" for p in ("fwd", "bwd", "fwdbwd"))
            print(f"{head_dim:4d} {kv_heads:4d} {n:6d} {name:>8} | {vals} | {ratios:>20} | {r['identical_results']}",
                  flush=True)
    with open(args.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
