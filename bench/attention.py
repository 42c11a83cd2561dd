"""GQA training attention: mgqa's Triton kernels against PyTorch's own, on one CUDA GPU.

For each shape (B*N = 16k tokens, H = 32 query heads) it times forward and forward+backward of
mgqa's kernels, SDPA flash, SDPA cuDNN and FlexAttention (compiled), all with ``enable_gqa=True``,
checks mgqa's output and gradients against SDPA flash, and measures peak memory of
forward+backward against repeat-K/V + SDPA flash. Prints a table and writes JSON, with the kernel
plan mgqa ran for each shape (``AttentionPlan.describe()``).

mgqa's implementations differ only in the ``KernelOptions`` they pass: ``mgqa`` is the default
plan, ``mgqa_tl`` the plain-Triton fallback (``KernelOptions(gluon=False)``, what non-Hopper GPUs
run). ``--no-autotune`` gives both ``autotune=False`` (the first launch config that fits).

FLOPs: forward = 4*B*H*N^2*D (halved when causal); forward+backward = 3.5 x forward.

    python bench/attention.py --quick --json bench/results/attention.json

Before timing, worker processes run every shape once (``--warm-workers``), so that Triton's and
Inductor's on-disk caches hold every kernel mgqa's autotuner and FlexAttention will need; the timing
process then loads them instead of compiling one after another. Each group of shapes is printed as it
finishes; a group whose worker dies, or that is still compiling after ``--warm-timeout`` seconds, is
named and compiles while timing instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from mgqa.kernels import KernelOptions, plan_for_inputs, triton_attention

TOKENS = 16384
HEADS = 32


def shapes(quick: bool, lengths=(1024, 4096, 8192, 16384)):
    if quick:
        yield from [
            (128, 8, 4096, True), (128, 8, 4096, False), (128, 8, 8192, True), (128, 8, 8192, False),
            (128, 8, 1024, True), (128, 8, 16384, True), (128, 1, 4096, True), (128, 32, 4096, True),
            (64, 8, 4096, True),
        ]
        return
    for head_dim, kv_heads, n, causal in itertools.product((128, 64), (8, 1, 32), lengths, (True, False)):
        yield head_dim, kv_heads, n, causal


def sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return run


def repeat_kv_sdpa(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


_flex_compiled = None
_block_masks: dict = {}


def flex(q, k, v, causal):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    mask = None
    if causal:
        key = (q.shape[2], k.shape[2])
        if key not in _block_masks:
            _block_masks[key] = create_block_mask(
                lambda b, h, qi, ki: qi >= ki, B=None, H=None, Q_LEN=q.shape[2], KV_LEN=k.shape[2]
            )
        mask = _block_masks[key]
    return _flex_compiled(q, k, v, block_mask=mask, enable_gqa=True)


# mgqa's implementations: the KernelOptions fields each one sets (the rest keep their defaults).
MGQA_OPTIONS = {
    "mgqa": {},  # the default plan
    "mgqa_tl": {"gluon": False},  # the plain-Triton fallback: no Gluon kernel anywhere
}
PEERS = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flex": flex}
IMPLS = (*MGQA_OPTIONS, *PEERS)


def kernel_options(name: str, autotune: bool = True) -> KernelOptions:
    """The KernelOptions of mgqa implementation ``name``."""
    return KernelOptions(autotune=autotune, **MGQA_OPTIONS[name])


def implementation(name: str, autotune: bool = True):
    """``fn(q, k, v, causal)`` of implementation ``name``; mgqa's with that implementation's options."""
    if name in PEERS:
        return PEERS[name]
    options = kernel_options(name, autotune)

    def run(q, k, v, causal):
        return triton_attention(q, k, v, causal=causal, options=options)

    return run


def plan_of(q, k, v, causal, options: KernelOptions):
    """The AttentionPlan mgqa's kernels follow for these inputs (q (B, H, Nq, D), k and v (B, Hkv, Nk, D))."""
    return plan_for_inputs(q, k, v, causal=causal, options=options)


def parse_impls(parser: argparse.ArgumentParser, text: str, *extra: str) -> list[str]:
    """The comma-separated implementation names of ``text``; an unknown one (there or in ``extra``)
    is a usage error that names it and the choices."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in (*names, *extra) if name and name not in IMPLS]
    if unknown:
        parser.error(f"unknown implementation(s) {unknown}; choose from {', '.join(IMPLS)}")
    return names


def int_list(parser: argparse.ArgumentParser, name: str, text: str) -> list[int]:
    """The positive integers of the comma-separated ``text`` given as --``name``; anything else is a
    usage error that names the value."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--{name} {text!r}: expected comma-separated integers")
    if not values or any(value < 1 for value in values):
        parser.error(f"--{name} {text!r}: expected positive integers")
    return values


def cuda_missing(script: str) -> bool:
    """True (after saying so on stderr) where there is no CUDA GPU for ``script`` to time."""
    if torch.cuda.is_available():
        return False
    print(f"{script} needs a CUDA GPU", file=sys.stderr)
    return True


def time_ms(fn, grads=None) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def peak_fwd_bwd_bytes(fn, q, k, v, do, causal) -> int:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(q, k, v, causal).backward(do)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_inputs(head_dim, kv_heads, n, dtype):
    batch = TOKENS // n
    gen = dict(device="cuda", dtype=dtype)
    q = torch.randn(batch, HEADS, n, head_dim, **gen).requires_grad_()
    k = torch.randn(batch, kv_heads, n, head_dim, **gen).requires_grad_()
    v = torch.randn(batch, kv_heads, n, head_dim, **gen).requires_grad_()
    do = torch.randn(batch, HEADS, n, head_dim, **gen)
    return q, k, v, do


def warm_worker(task):
    """Run forward+backward once per shape for every compiled implementation (fills the caches);
    returns what failed, for the timing process to report."""
    shape_list, impls, dtype_name, autotune = task
    torch._dynamo.config.cache_size_limit = 256
    failures = []
    for head_dim, kv_heads, n, causal in shape_list:
        q, k, v, do = make_inputs(head_dim, kv_heads, n, getattr(torch, dtype_name))
        for name in impls:
            if name.startswith("sdpa"):
                continue
            try:
                implementation(name, autotune)(q, k, v, causal).backward(do)
            except Exception as err:  # the timing process times it again and records the error
                failures.append(f"{name} at {head_dim},{kv_heads},{n},{int(causal)}: {type(err).__name__}")
    torch.cuda.synchronize()
    return failures


def warm_up(shape_list, impls, dtype_name, workers, timeout_s, worker=None, autotune=True):
    """Shapes that differ only in N share kernel binaries: one worker per (D, Hkv, causal) group.
    Prints each group as it finishes. A group whose worker dies or is still compiling after
    ``timeout_s`` is named and left to compile while timing; the others' kernels stay cached.
    ``worker`` (default ``warm_worker``) runs one group."""
    groups = defaultdict(list)
    for shape in shape_list:
        groups[(shape[0], shape[1], shape[3])].append(shape)
    pool = ProcessPoolExecutor(min(workers, len(groups)), mp_context=mp.get_context("spawn"))
    start = time.time()
    futures = {pool.submit(worker or warm_worker, (group, impls, dtype_name, autotune)): key for key, group in groups.items()}
    try:
        for future in as_completed(futures, timeout=timeout_s):
            head_dim, kv_heads, causal = futures[future]
            try:
                failures = future.result()
            except Exception as err:  # a worker that died takes the pool with it
                print(f"warm-up of D={head_dim} Hkv={kv_heads} causal={causal} failed: {type(err).__name__}: "
                      f"{err}", file=sys.stderr, flush=True)
                continue
            print(f"  warmed D={head_dim} Hkv={kv_heads} causal={causal} in {time.time() - start:.0f} s"
                  + (f"; failed there: {', '.join(failures)}" if failures else ""), flush=True)
    except FuturesTimeout:
        left = [f"D={d} Hkv={h} causal={c}" for future, (d, h, c) in futures.items() if not future.done()]
        print(f"warm-up: still compiling after {timeout_s:.0f} s, left to the timing run: {', '.join(left)}",
              file=sys.stderr, flush=True)
    finally:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()  # a stuck compile would hold shutdown forever
        pool.shutdown(wait=False, cancel_futures=True)


def bench_shape(head_dim, kv_heads, n, causal, impls, dtype, repeat=1, autotune=True):
    batch = TOKENS // n
    q, k, v, do = make_inputs(head_dim, kv_heads, n, dtype)
    flops = 4 * batch * HEADS * n * n * head_dim * (0.5 if causal else 1.0)
    row = dict(B=batch, H=HEADS, Hkv=kv_heads, N=n, D=head_dim, causal=causal, dtype=str(dtype))
    for name in impls:
        if name in MGQA_OPTIONS:
            row[f"{name}_plan"] = plan_of(q, k, v, causal, kernel_options(name, autotune)).describe()
    fns = {name: implementation(name, autotune) for name in impls}
    mgqa = implementation("mgqa", autotune)

    # Correctness of the default plan against SDPA flash.
    ref = sdpa(SDPBackend.FLASH_ATTENTION)(q, k, v, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    out = mgqa(q, k, v, causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    row["err_vs_flash"] = max(rel_err(a, b) for a, b in zip((out, *grads), (ref, *ref_grads)))
    del ref, ref_grads, out, grads

    readings: dict = defaultdict(list)
    for r in range(repeat):
        # Rounds over all implementations, in reverse order every other round: clock drift, and
        # whatever the previous implementation leaves behind, hit each alike.
        for name in impls if r % 2 == 0 else impls[::-1]:
            fn = fns[name]
            try:
                fwd = time_ms(lambda: fn(q, k, v, causal))
                fwd_bwd = time_ms(lambda: fn(q, k, v, causal).backward(do), grads=[q, k, v])
                readings[f"{name}_fwd"].append(flops / fwd / 1e9)
                readings[f"{name}_fwdbwd"].append(3.5 * flops / fwd_bwd / 1e9)
            except Exception as err:  # a peer refusing a shape is a result, not a crash
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    for name in impls:
        for phase in ("fwd", "fwdbwd"):
            values = sorted(readings.get(f"{name}_{phase}", []))
            row[f"{name}_{phase}"] = values[len(values) // 2] if values else None  # the median reading
            if repeat > 1:
                row[f"{name}_{phase}_readings"] = values
    for phase in ("fwd", "fwdbwd"):
        peers = [row.get(f"{p}_{phase}") for p in impls if not p.startswith("mgqa")]
        peers = [x for x in peers if x]
        if peers and row.get(f"mgqa_{phase}"):
            row[f"ratio_{phase}"] = row[f"mgqa_{phase}"] / max(peers)
    row["peak_mib_mgqa"] = peak_fwd_bwd_bytes(mgqa, q, k, v, do, causal) / 2**20
    row["peak_mib_repeat_kv_sdpa"] = peak_fwd_bwd_bytes(repeat_kv_sdpa, q, k, v, do, causal) / 2**20
    return row


def fmt(x, width=6, prec=0):
    return f"{x:{width}.{prec}f}" if isinstance(x, (int, float)) and x is not None else " " * (width - 1) + "-"


def print_table(rows, impls):
    head = f"{'D':>4} {'Hkv':>4} {'N':>6} {'c':>2} |" + "".join(f" {n[:10]:>10} fwd/fb |" for n in impls)
    head += " ratio fwd/fb | peak MiB mgqa/repKV | err"
    print(head)
    for r in rows:
        line = f"{r['D']:>4} {r['Hkv']:>4} {r['N']:>6} {'y' if r['causal'] else 'n':>2} |"
        for n in impls:
            line += f" {fmt(r.get(n + '_fwd'), 8)}/{fmt(r.get(n + '_fwdbwd'), 5)} |"
        line += f" {fmt(r.get('ratio_fwd'), 5, 2)}/{fmt(r.get('ratio_fwdbwd'), 5, 2)} |"
        line += f" {fmt(r['peak_mib_mgqa'], 8)}/{fmt(r['peak_mib_repeat_kv_sdpa'], 8)} | {r['err_vs_flash']:.1e}"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 9-shape subset instead of the full 48")
    parser.add_argument("--only", default=None, help="keep shapes whose 'D,Hkv,N,causal' matches this regex, e.g. '^128,8,(4096|8192),'")
    parser.add_argument("--lengths", default="1024,4096,8192,16384",
                        help="sequence lengths of the full grid (ignored with --quick); B = 16384 // N")
    parser.add_argument("--json", default="attention_bench.json", help="where to write the results")
    parser.add_argument("--impls", default="mgqa,sdpa_flash,sdpa_cudnn,flex", help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-autotune", action="store_true",
                        help="mgqa's kernels take the first launch config that fits (KernelOptions(autotune=False))")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time every implementation this many times per shape, in rounds (the order reversed every other round), and report the median")
    parser.add_argument("--warm-workers", type=int, default=min(12, os.cpu_count() or 1),
                        help="processes that compile every shape's kernels before timing (0: compile while timing)")
    parser.add_argument("--warm-timeout", type=float, default=600.0,
                        help="seconds the warm-up may take; groups of shapes still compiling then compile while timing")
    args = parser.parse_args()
    impls = parse_impls(parser, args.impls)
    lengths = tuple(int_list(parser, "lengths", args.lengths))
    grid = list(shapes(args.quick, lengths))
    selected = [s for s in grid if not args.only or re.search(args.only, f"{s[0]},{s[1]},{s[2]},{int(s[3])}")]
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.warm_timeout <= 0:
        parser.error(f"--warm-timeout must be positive, got {args.warm_timeout}")
    if not selected:
        parser.error(f"--only {args.only!r} matches none of the {len(grid)} shapes, written 'D,Hkv,N,causal' "
                     "with causal 0 or 1 (e.g. 128,8,4096,1)")
    if cuda_missing("bench/attention.py"):
        return 2
    torch._dynamo.config.cache_size_limit = 256  # FlexAttention recompiles per shape
    autotune = not args.no_autotune
    dtype = getattr(torch, args.dtype)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=TOKENS, heads=HEADS, units="TFLOP/s", repeat=args.repeat,
                flops="fwd 4*B*H*N^2*D (x0.5 causal); fwd+bwd 3.5x fwd", autotune=autotune)
    if args.warm_workers > 0:
        start = time.time()
        warm_up(selected, impls, args.dtype, args.warm_workers, args.warm_timeout, autotune=autotune)
        meta["warm_up_s"] = time.time() - start
        print(f"compiled the kernels of {len(selected)} shapes in {meta['warm_up_s']:.0f} s", flush=True)
    rows = []
    for head_dim, kv_heads, n, causal in selected:
        rows.append(bench_shape(head_dim, kv_heads, n, causal, impls, dtype, args.repeat, autotune))
        r = rows[-1]
        print(f"D={head_dim} Hkv={kv_heads} N={n} causal={causal}: "
              + " ".join(f"{i}={fmt(r.get(i + '_fwd'), 1)}/{fmt(r.get(i + '_fwdbwd'), 1)}" for i in impls)
              + f" err={r['err_vs_flash']:.1e}", flush=True)
        for name in impls:
            if f"{name}_plan" in r:
                print(f"  {name} plan: {r[name + '_plan']}", flush=True)
        with open(args.json, "w") as f:  # after every shape, so a cut-short run keeps what it measured
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {args.dtype}, TFLOP/s")
    print_table(rows, impls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
