"""Run each attention implementation's forward and backward once inside a CUDA profiler range, for
Nsight Compute to read hardware counters (L2 and tensor-pipe throughput, warp stall reasons) of
mgqa's kernels next to the peers' on the same shape.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        python bench/profile_attention.py --n 4096 --kv-heads 8 --head-dim 128 [--causal]

Every implementation is run (compiled, autotuned) twice before the profiled call, so only steady-state
kernels land in the range. Without ncu it just prints the kernels' wall time per implementation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import mgqa, sdpa  # noqa: E402

TOKENS = 16384
HEADS = 32


def gluon(variant):
    def run(q, k, v, causal):
        from bench.gluon_attention import gluon_forward  # noqa: PLC0415 (needs Gluon, GPU only)

        if causal:
            raise ValueError("the Gluon experiment is non-causal only")
        return gluon_forward(q, k, v, variant)
    return run


IMPLS = {
    "mgqa": (mgqa, True),
    "sdpa_flash": (sdpa(SDPBackend.FLASH_ATTENTION), True),
    "sdpa_cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), True),
    "gluon_overlap": (gluon("overlap_128x64_w4"), False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="sequence length (batch = 16384 // n)")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, from {', '.join(IMPLS)}")
    args = parser.parse_args()
    names = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = [name for name in names if name not in IMPLS]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    batch = max(1, TOKENS // args.n)
    gen = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, HEADS, args.n, args.head_dim, **gen)
    k = torch.randn(batch, args.kv_heads, args.n, args.head_dim, **gen)
    v = torch.randn(batch, args.kv_heads, args.n, args.head_dim, **gen)
    do = torch.randn_like(q)
    print(f"{torch.cuda.get_device_name()}: B={batch} H={HEADS} Hkv={args.kv_heads} N={args.n} "
          f"D={args.head_dim} causal={args.causal} bf16", flush=True)
    for name in names:
        fn, has_backward = IMPLS[name]
        leaves = [t.detach().clone().requires_grad_(has_backward) for t in (q, k, v)]

        def step():
            out = fn(*leaves, args.causal)
            if has_backward:
                out.backward(do)
            return out

        try:
            for _ in range(2):
                step()
        except Exception as err:  # a peer missing on this build: report and go on
            print(f"{name}: skipped ({type(err).__name__}: {str(err)[:200]})", flush=True)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.profiler.start()
        torch.cuda.nvtx.range_push(name)
        start.record()
        step()
        end.record()
        torch.cuda.nvtx.range_pop()
        torch.cuda.profiler.stop()
        torch.cuda.synchronize()
        print(f"{name}: {'fwd+bwd' if has_backward else 'fwd'} {start.elapsed_time(end):.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
