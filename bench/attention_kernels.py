"""Where forward+backward spends its time: GPU time per kernel, for mgqa's variants and the peers.

For each shape (B*N = 16k tokens, H = 32 query heads) and implementation, forward+backward runs a few
times under ``torch.profiler``; the GPU time of every kernel is summed by name and divided by the
number of profiled calls. Kernel times add up to less than the end-to-end time of bench/attention.py
(launch gaps are not counted), so this script says which kernel to work on, and attention.py says
what the user gets.

    python bench/attention_kernels.py --shapes 128,8,4096,1 128,32,4096,1 \\
        --impls mgqa,mgqa_persistent_bwd,sdpa_flash --json bench/results/attention_kernels.json

Prints one table per shape (kernel, µs per call, share of the implementation's total, TFLOP/s of
the implementation's kernels alone) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import defaultdict
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import HEADS, IMPLS, TOKENS, cuda_missing, make_inputs, parse_impls, set_mgqa_flags  # noqa: E402


def parse_shape(text: str) -> tuple[int, int, int, bool]:
    """'D,Hkv,N,causal' (causal 0 or 1) -> a shape tuple; a clear error otherwise."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts) or parts[3].strip() not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"shape {text!r} is not 'D,Hkv,N,causal' with causal 0 or 1")
    head_dim, kv_heads, n, causal = (int(p) for p in parts)
    if HEADS % kv_heads or TOKENS % n:
        raise argparse.ArgumentTypeError(f"shape {text!r}: Hkv must divide {HEADS} and N must divide {TOKENS}")
    return head_dim, kv_heads, n, bool(causal)


def shape_parser(doc: str, calls: int, calls_help: str) -> argparse.ArgumentParser:
    """The arguments this script shares with bench/host_overhead.py: --shapes, --impls, --calls."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape("128,8,4096,1")],
                        help="shapes as 'D,Hkv,N,causal', e.g. 128,8,4096,1 (batch = 16384 // N, H = 32)")
    parser.add_argument("--impls", default="mgqa,sdpa_flash", help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--calls", type=int, default=calls, help=calls_help)
    return parser


def kernel_times(fn, q, k, v, do, causal, calls: int) -> dict[str, float]:
    """Mean GPU µs per forward+backward call, by kernel name."""
    grads = (q, k, v)

    def step():
        for t in grads:
            t.grad = None
        fn(q, k, v, causal).backward(do)

    for _ in range(3):  # compiled, autotuned and warm before the profiled calls
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / calls
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def main() -> int:
    parser = shape_parser(__doc__, 5, "profiled forward+backward calls per implementation")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--json", default="attention_kernels.json", help="where to write the results")
    args = parser.parse_args()
    names = parse_impls(parser, args.impls)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if cuda_missing("bench/attention_kernels.py"):
        return 2
    torch._dynamo.config.cache_size_limit = 256

    rows = []
    for head_dim, kv_heads, n, causal in args.shapes:
        q, k, v, do = make_inputs(head_dim, kv_heads, n, getattr(torch, args.dtype))
        flops = 3.5 * 4 * q.shape[0] * HEADS * n * n * head_dim * (0.5 if causal else 1.0)
        print(f"\nD={head_dim} Hkv={kv_heads} N={n} causal={causal} (B={q.shape[0]}, H={HEADS})")
        for name in names:
            set_mgqa_flags(name)
            try:
                times = kernel_times(IMPLS[name], q, k, v, do, causal, args.calls)
            except Exception as err:  # a peer refusing a shape is a result, not a crash
                print(f"  {name}: {type(err).__name__}: {str(err)[:200]}")
                rows.append(dict(D=head_dim, Hkv=kv_heads, N=n, causal=causal, impl=name, error=str(err)[:500]))
                continue
            finally:
                set_mgqa_flags("defaults")
            total = sum(times.values())
            print(f"  {name}: {total:8.1f} µs of kernels per call, {flops / total / 1e6:5.0f} TFLOP/s")
            for kernel, us in times.items():
                if us >= 0.005 * total:
                    print(f"    {us:8.1f} µs {100 * us / total:5.1f}%  {short(kernel)}")
            rows.append(dict(D=head_dim, Hkv=kv_heads, N=n, causal=causal, B=q.shape[0], H=HEADS, impl=name,
                             total_us=total, tflops_kernels=flops / total / 1e6, kernels_us=times))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), dtype=args.dtype, calls=args.calls)
    Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
