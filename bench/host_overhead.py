"""Host-side cost of one attention call: how long the CPU takes to enqueue it, and how much of the
end-to-end time that bench/attention.py reports is the GPU waiting for the host.

For each shape and implementation:
- ``enqueue``: CPU µs per forward and per forward+backward call while the GPU is kept busy (a long
  ``torch.cuda._sleep`` queued first), so no call waits for the GPU;
- ``eager``: the median forward+backward time as bench/attention.py measures it (``do_bench``,
  L2 flushed between calls), in µs;
- ``graph``: the same call captured in a CUDA graph and replayed (``do_bench_cudagraph``): GPU time
  with no host in the way. ``eager - graph`` is what the host costs the benchmark.

With ``--profile NAME`` it also prints the Python functions that take the host time of NAME's
forward+backward (cProfile, cumulative).

    python bench/host_overhead.py --shapes 128,8,4096,1 128,8,1024,1 --impls mgqa,sdpa_flash
"""

from __future__ import annotations

import cProfile
import json
import platform
import pstats
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import HEADS, IMPLS, cuda_missing, make_inputs, parse_impls, set_mgqa_flags  # noqa: E402
from bench.attention_kernels import shape_parser  # noqa: E402


def enqueue_us(step, calls: int) -> float:
    """CPU µs per call of ``step`` while the GPU is busy with a long sleep queued first."""
    step()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU spin at H100 clocks: the queue never drains
    start = time.perf_counter()
    for _ in range(calls):
        step()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> int:
    parser = shape_parser(__doc__, 20, "calls per enqueue measurement")
    parser.add_argument("--profile", default=None, help="an implementation whose host time to break down")
    parser.add_argument("--json", default="host_overhead.json", help="where to write the results")
    args = parser.parse_args()
    names = parse_impls(parser, args.impls, args.profile or "")
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if cuda_missing("bench/host_overhead.py"):
        return 2

    rows = []
    print(f"{'shape':>16} {'impl':>20} | enqueue fwd / fwd+bwd µs | eager / graph fwd+bwd µs | host share")
    for head_dim, kv_heads, n, causal in args.shapes:
        q, k, v, do = make_inputs(head_dim, kv_heads, n, torch.bfloat16)
        for name in names:
            fn = IMPLS[name]
            set_mgqa_flags(name)

            def fwd():
                return fn(q, k, v, causal)

            def fwd_bwd():
                for t in (q, k, v):
                    t.grad = None
                fn(q, k, v, causal).backward(do)

            row = dict(D=head_dim, Hkv=kv_heads, N=n, causal=causal, B=q.shape[0], H=HEADS, impl=name)
            try:
                row["enqueue_fwd_us"] = enqueue_us(fwd, args.calls)
                row["enqueue_fwd_bwd_us"] = enqueue_us(fwd_bwd, args.calls)
                row["eager_fwd_bwd_us"] = 1e3 * triton.testing.do_bench(
                    fwd_bwd, warmup=25, rep=100, return_mode="median")
                try:
                    row["graph_fwd_bwd_us"] = 1e3 * triton.testing.do_bench_cudagraph(
                        fwd_bwd, rep=100, return_mode="median")
                except Exception as err:  # not every implementation captures
                    row["graph_error"] = f"{type(err).__name__}: {str(err)[:200]}"
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            finally:
                set_mgqa_flags("defaults")
            rows.append(row)
            graph = row.get("graph_fwd_bwd_us")
            share = (row["eager_fwd_bwd_us"] - graph) / row["eager_fwd_bwd_us"] if graph and "eager_fwd_bwd_us" in row \
                else None
            print(f"{f'{head_dim},{kv_heads},{n},{int(causal)}':>16} {name:>20} | "
                  f"{row.get('enqueue_fwd_us', float('nan')):8.0f} / {row.get('enqueue_fwd_bwd_us', float('nan')):8.0f}"
                  f"      | {row.get('eager_fwd_bwd_us', float('nan')):8.0f} / {graph or float('nan'):8.0f}     | "
                  f"{'-' if share is None else f'{100 * share:5.1f}%'}"
                  f"{'  ' + row['error'] if 'error' in row else ''}{'  graph: ' + row['graph_error'] if 'graph_error' in row else ''}")

        if args.profile:
            fn = IMPLS[args.profile]
            set_mgqa_flags(args.profile)
            fn(q, k, v, causal).backward(do)
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2e9))
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.calls):
                for t in (q, k, v):
                    t.grad = None
                fn(q, k, v, causal).backward(do)
            profiler.disable()
            torch.cuda.synchronize()
            set_mgqa_flags("defaults")
            print(f"\nhost time of {args.profile}'s forward+backward, {args.calls} calls "
                  f"(D={head_dim} Hkv={kv_heads} N={n} causal={causal}):")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())
    Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
