"""Every launch configuration of mgqa's three attention kernels, timed one by one on one CUDA GPU.

For each shape it times the forward, dK/dV and dQ kernels alone under every candidate config
(block sizes, warps, pipeline stages, register cap) with Triton's own autotuner, and reports each
kernel's TFLOP/s on the matmuls it performs (forward: 2 per tile, dK/dV: 4, dQ: 3; see
``attention_bwd``), best first. Then, with the best configs, it times forward and forward+backward
end to end next to SDPA flash and SDPA cuDNN in the same process. Prints tables and writes JSON.

Compiling ~100 configs per shape dominates the run, so a first phase compiles them in parallel
worker processes (one launch each fills Triton's on-disk cache); the timing phase then runs in this
process alone, one kernel at a time.

    python bench/attention_configs.py --json bench/results/attention_configs_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import time

import torch
import triton

TOKENS = 16384
HEADS = 32
SHAPES = [(128, 8, 4096, True), (128, 8, 4096, False), (128, 8, 8192, True), (64, 8, 4096, True)]


def _cfg(bm, bn, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# Candidates: the production lists plus deeper pipelines, other warp counts, and register caps that
# let two 8-warp programs share an SM (65536 registers / 512 threads = 128).
FWD = [_cfg(bm, bn, w, s) for bm, bn, w in [(128, 64, 8), (128, 128, 8), (128, 64, 4), (64, 64, 4), (64, 128, 4)]
       for s in (2, 3, 4, 5)] + [_cfg(128, 64, 8, s, 128) for s in (2, 3)] + [_cfg(128, 128, 8, 2, 128)]
DKDV = [_cfg(bm, bn, w, s) for bm in (16, 32, 64) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)
        if not (bm == 16 and w == 8)]
DQ = [_cfg(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
      if not (bm == 64 and w == 8)]


def kernels():
    from mgqa.kernels import attention_bwd, attention_fwd

    return {"fwd": (attention_fwd._attn_fwd, FWD), "dkdv": (attention_bwd._attn_bwd_dkdv, DKDV),
            "dq": (attention_bwd._attn_bwd_dq, DQ)}


def make_inputs(head_dim, kv_heads, n, batch, device="cuda", dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, HEADS, n, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, kv_heads, n, head_dim, device=device, dtype=dtype, generator=gen)
    do = torch.randn(batch, HEADS, n, head_dim, device=device, dtype=dtype, generator=gen)
    return q, k, v, do


def run_once(head_dim, kv_heads, n, causal):
    """Forward and backward once, at the timed batch size, with whatever configs the autotuners hold."""
    from mgqa.kernels import attention as K

    q, k, v, do = make_inputs(head_dim, kv_heads, n, TOKENS // n)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = K.attention_forward(q, k, v, causal, scale)
    K.attention_backward(do, q, k, v, out, lse, causal, scale)
    torch.cuda.synchronize()


def _reset(tuner, configs):
    tuner.configs = configs
    tuner.cache = {}


def compile_worker(tasks):
    """Phase 1: launch each (shape, kernel, config) once, the other two kernels on their first
    config, so that Triton compiles it into its on-disk cache."""
    failures = []
    ks = kernels()
    for shape, name, index in tasks:
        for other, (tuner, configs) in ks.items():
            _reset(tuner, [configs[index if other == name else 0]])
        try:
            run_once(*shape)
        except Exception as err:  # out of resources etc.: the timing phase reports it as inf
            failures.append(f"{shape} {name} {describe(ks[name][1][index])}: {type(err).__name__}: {str(err)[:100]}")
    return failures


def precompile(shapes, workers):
    sizes = {"fwd": len(FWD), "dkdv": len(DKDV), "dq": len(DQ)}
    tasks = [(shape, name, i) for shape in shapes for name, size in sizes.items() for i in range(size)]
    chunks = [tasks[w::workers] for w in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        return [f for part in pool.map(compile_worker, chunks) for f in part]


def fwd_flops(batch, n, head_dim, causal):
    flops = 4 * batch * HEADS * n * n * head_dim
    return flops / 2 if causal else flops


def describe(cfg):
    text = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
    return text + (f" r{cfg.maxnreg}" if cfg.maxnreg else "")


def time_shape(head_dim, kv_heads, n, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mgqa.kernels import attention as K

    batch = TOKENS // n
    ks = kernels()
    for _, (tuner, configs) in ks.items():
        _reset(tuner, list(configs))
    run_once(head_dim, kv_heads, n, causal)  # the autotuners time every config here
    q, k, v, do = make_inputs(head_dim, kv_heads, n, batch)
    f = fwd_flops(batch, n, head_dim, causal)
    matmul_flops = {"fwd": f, "dkdv": 2 * f, "dq": 1.5 * f}
    row = {"D": head_dim, "Hkv": kv_heads, "N": n, "B": batch, "causal": causal, "kernels": {}}
    for name, (tuner, _) in ks.items():
        timings = getattr(tuner, "configs_timings", None) or {}
        ranked = sorted(timings.items(), key=lambda kv: kv[1][0])
        row["kernels"][name] = [
            {"config": describe(c), "ms": t[0], "tflops": matmul_flops[name] / (t[0] * 1e-3) / 1e12 if t[0] < 1e9 else 0.0}
            for c, t in ranked
        ]
    # Correctness of the picked configs: batch 0 against float64 (relative Frobenius error).
    from attention_variants import reference64, rel_err

    scale = 1.0 / math.sqrt(head_dim)
    out, lse = K.attention_forward(q, k, v, causal, scale)
    got = (out, *K.attention_backward(do, q, k, v, out, lse, causal, scale))
    ref = reference64(q[0], k[0], v[0], do[0], causal, scale)
    row["rel_err"] = {name: rel_err(g[0], r) for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    del got, ref, out, lse
    # End to end with the configs the autotuners picked, peers in the same process.
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def bench(fn):
        fwd = triton.testing.do_bench(lambda: fn(q, k, v))
        fwd_bwd = triton.testing.do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
        return f / (fwd * 1e-3) / 1e12, 3.5 * f / (fwd_bwd * 1e-3) / 1e12

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        return run

    row["end_to_end"] = {
        "mgqa": bench(lambda q, k, v: K.triton_attention(q, k, v, causal=causal)),
        "sdpa_flash": bench(sdpa(SDPBackend.FLASH_ATTENTION)),
        "sdpa_cudnn": bench(sdpa(SDPBackend.CUDNN_ATTENTION)),
    }
    return row


def print_row(row, top):
    print(f"\nD={row['D']} Hkv={row['Hkv']} N={row['N']} B={row['B']} causal={row['causal']}")
    for name, ranked in row["kernels"].items():
        finite = [r for r in ranked if r["tflops"] > 0]
        print(f"  {name:5s} ({len(finite)}/{len(ranked)} configs ran)")
        for r in finite[:top]:
            print(f"    {r['config']:22s} {r['ms']:8.3f} ms {r['tflops']:6.0f} TFLOP/s")
    print("  rel. error vs float64 (batch 0): " + ", ".join(f"{k} {v:.1e}" for k, v in row["rel_err"].items()))
    print("  end to end (TFLOP/s fwd / fwd+bwd): "
          + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in row["end_to_end"].items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="attention_configs.json")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--top", type=int, default=6, help="configs printed per kernel")
    parser.add_argument("--shapes", default=None,
                        help="subset of the shapes, as D:Hkv:N:causal items separated by commas, e.g. 128:8:4096:1")
    args = parser.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [(int(d), int(h), int(n), bool(int(c))) for d, h, n, c in
                  (item.split(":") for item in args.shapes.split(","))]
    start = time.time()
    failures = precompile(shapes, args.workers)
    compiled_s = time.time() - start
    print(f"compiled in {compiled_s:.0f} s with {args.workers} workers; {len(failures)} launches failed")
    for line in failures[:10]:
        print("  ", line)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "compile_s": compiled_s, "tokens": TOKENS, "heads": HEADS}
    rows = []
    for shape in shapes:
        rows.append(time_shape(*shape))
        print_row(rows[-1], args.top)
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"\nwrote {args.json}; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
