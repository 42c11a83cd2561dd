"""Each of Inductor's kernels in the compiled training step, against the card's memory bandwidth.

    python bench/kernel_bandwidth.py --shape 125m
    python bench/kernel_bandwidth.py --shape 1b --impl mgqa_compiled_sdpa --top 40

Runs `--steps` optimizer steps of one `bench/train_throughput.py` variant (blocks compiled, chunked
loss, fused AdamW) under Inductor's per-kernel profiler (`TORCHINDUCTOR_PROFILE`): every generated
Triton kernel (the fused norms, rotary, SwiGLU, residual adds, the loss's chunk step) is timed alone
and its bytes read and written counted. Matrix products, attention and the optimizer are not
Inductor's and do not appear; `bench/train_throughput.py --profile` times those.

Inductor's per-kernel benchmark copies a kernel's in-place arguments inside every timed call (so
that timing does not change the step's values), which adds the copy of each in-place buffer to
that kernel's time. Here the copies are made once, before the kernel is timed
(`clones_outside_timing`), so in-place kernels are timed as the others.

Prints a Markdown table of the kernels taking the most time per step, with their bandwidth and its
share of the card's device-to-device copy bandwidth (measured as `bench/decode.py` does), and writes
JSON (`--out`). A kernel well below the
bandwidth with a large share of the step is where a hand-written kernel could beat compile. The
profiler times each kernel in isolation, so the step is slower than in `train_throughput.py`; only
the per-kernel figures mean anything here.

`--code-dir DIR` also writes the Triton source of each kernel in the printed table to
`DIR/<kernel>.py`, headed by Inductor's comment naming the model's operations it fuses: what to read
before deciding why a kernel runs below the bandwidth. `--inductor KEY=VALUE,...` compiles under
those settings of `torch._inductor.config` (as in `bench/train_throughput.py`), to see what a
setting does to one kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

# One kernel call in Inductor's output file: "<ms>ms <GB> GB <GB/s>GB/s <share>% <kernel name>".
_CALL = re.compile(r"^\s*([0-9.]+)ms\s+([0-9.]+) GB\s+([0-9.]+)GB/s\s+([0-9.]+)%\s+(\S+)\s*$")
# One kernel in a graph's generated module: Inductor's comment lines, then
# "<name> = async_compile.triton('<name>', '''<source>''', device_str='cuda')".
_KERNEL = re.compile(
    r"((?:^(?:#[^\n]*)?\n)*)^(\w+) = async_compile\.triton\('\2', '''\n(.*?)\n''', device_str='\w+'\)",
    re.MULTILINE | re.DOTALL,
)


@contextlib.contextmanager
def clones_outside_timing():
    """Within: Inductor's per-kernel benchmark (`CachingAutotuner.bench`) copies a kernel's in-place
    arguments once, before timing it, instead of inside every timed call (or to the host and back,
    where memory is short). The timed calls then all write into the same copies, whose values do not
    change the kernel's time; the step's own buffers are untouched either way."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner  # noqa: PLC0415

    bench, clone = CachingAutotuner.bench, CachingAutotuner.maybe_clone_args

    def bench_with_clones_made_first(self, launcher, *args, **kwargs):
        copies = clone(self, (), *args, **{k: v for k, v in kwargs.items() if k != "with_profiler"})
        self.maybe_clone_args = lambda exclude, *_args, **_kwargs: copies
        self.copy_args_to_cpu_if_needed = lambda *_args, **_kwargs: {}
        try:
            return bench(self, launcher, *args, **kwargs)
        finally:
            del self.maybe_clone_args, self.copy_args_to_cpu_if_needed

    CachingAutotuner.bench = bench_with_clones_made_first
    try:
        yield
    finally:
        CachingAutotuner.bench = bench


def parse_profile(text: str, steps: int, bandwidth_gbps: float | None = None) -> list[dict[str, Any]]:
    """Per kernel, summed over every call in Inductor's profile output and divided by ``steps``:
    calls, ms and GB a step, and GB/s (with its share of ``bandwidth_gbps`` where given); most
    time first."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for line in text.splitlines():
        match = _CALL.match(line)
        if match:
            ms, gb, name = float(match[1]), float(match[2]), match[5]
            total = totals[name]
            total[0] += 1
            total[1] += ms
            total[2] += gb
    rows = []
    for name, (calls, ms, gb) in totals.items():
        gbps = gb / (ms / 1e3) if ms > 0 else 0.0
        row = {"kernel": name, "calls_per_step": calls / steps, "ms_per_step": ms / steps, "gb_per_step": gb / steps,
               "gb_per_s": gbps}
        if bandwidth_gbps:
            row["bandwidth_share"] = gbps / bandwidth_gbps
        rows.append(row)
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def kernel_sources(text: str) -> dict[str, str]:
    """Each Triton kernel defined in a generated module's text: name -> its comment and source."""
    return {match[2]: match[1].strip("\n") + "\n" + match[3] + "\n" for match in _KERNEL.finditer(text)}


def write_sources(cache_dir: Path, names: list[str], code_dir: Path) -> list[str]:
    """Writes ``code_dir/<name>.py`` for each of ``names`` defined in a module under ``cache_dir``;
    returns the names written."""
    found: dict[str, str] = {}
    for module in sorted(cache_dir.rglob("*.py")):
        found.update(kernel_sources(module.read_text(errors="replace")))
    code_dir.mkdir(parents=True, exist_ok=True)
    written = [name for name in names if name in found]
    for name in written:
        (code_dir / f"{name}.py").write_text(found[name])
    return written


def table(rows: list[dict[str, Any]], top: int) -> str:
    total = sum(r["ms_per_step"] for r in rows)
    lines = ["| kernel | calls a step | ms a step | share of Inductor's time | GB a step | GB/s | of copy bandwidth |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        share = f"{100 * r['bandwidth_share']:.0f}%" if "bandwidth_share" in r else "-"
        lines.append(f"| `{r['kernel']}` | {r['calls_per_step']:g} | {r['ms_per_step']:.3f} | "
                     f"{100 * r['ms_per_step'] / total:.1f}% | {r['gb_per_step']:.3f} | {r['gb_per_s']:,.0f} | {share} |")
    lines.append(f"| all {len(rows)} kernels | | {total:.3f} | 100% | {sum(r['gb_per_step'] for r in rows):.3f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="125m", help="1b or 125m (bench/train_throughput.py's shapes)")
    parser.add_argument("--impl", default="mgqa_compiled_sdpa", help="a compiled mgqa variant of bench/train_throughput.py")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps profiled (after one to compile)")
    parser.add_argument("--top", type=int, default=25, help="kernels in the printed table")
    parser.add_argument("--out", default="", help="JSON path (default bench/results/kernel_bandwidth_<shape>.json)")
    parser.add_argument("--code-dir", default="", help="also write the Triton source of the table's kernels here")
    parser.add_argument("--inductor", default="default", metavar="SETTINGS",
                        help="KEY=VALUE,... of torch._inductor.config to compile under (default: its defaults)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        parser.error(f"--steps ({args.steps}) and --top ({args.top}) must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "kernels.txt"
        # Read when Inductor's config is first imported: before torch is.
        os.environ["TORCHINDUCTOR_PROFILE"] = "1"
        os.environ["TORCHINDUCTOR_PROFILE_OUTPUT"] = str(profile)
        # A fresh cache: every graph is compiled here, so its generated module is under it.
        cache_dir = Path(tmp) / "inductor"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        import torch  # noqa: PLC0415
        import torch._inductor.config as inductor_config  # noqa: PLC0415
        import train_throughput as tt  # noqa: PLC0415
        from decode import copy_bandwidth_gbs  # noqa: PLC0415

        if args.shape not in tt.SHAPES:
            parser.error(f"unknown shape {args.shape!r}; choose from {list(tt.SHAPES)}")
        if args.impl not in tt.IMPLS or "_compiled_" not in args.impl or not args.impl.startswith("mgqa"):
            compiled = [i for i in tt.IMPLS if i.startswith("mgqa") and "_compiled_" in i]
            parser.error(f"unknown or uncompiled implementation {args.impl!r}; choose from {compiled}")
        try:
            settings = tt.inductor_settings(args.inductor)
        except ValueError as err:
            parser.error(f"--inductor: {err}")
        if not torch.cuda.is_available():
            print("error: bench/kernel_bandwidth.py needs a CUDA GPU", file=sys.stderr)
            return 2
        # With a profile output file Inductor also runs each graph's benchmark harness at compile
        # time, which some torch versions call without its arguments: the per-kernel figures
        # need only the profiler, so the harness is left out.
        inductor_config.benchmark_harness = False
        torch.backends.cuda.matmul.allow_tf32 = True
        shape = tt.SHAPES[args.shape]
        with inductor_config.patch(settings), clones_outside_timing():
            tt.time_impl(args.impl, shape, args.steps, 1, None)
        text = profile.read_text() if profile.is_file() else ""
        bandwidth = copy_bandwidth_gbs(torch.device("cuda"))  # the card's practical ceiling, measured
        rows = parse_profile(text, args.steps + 1, bandwidth)  # time_impl's first step, then its timed ones
        shown = [r["kernel"] for r in rows[: args.top]]
        written = write_sources(cache_dir, shown, Path(args.code_dir)) if args.code_dir else []
    card = torch.cuda.get_device_name()
    if not rows:
        print("error: Inductor's profiler wrote no kernel timings (is this impl compiled?)", file=sys.stderr)
        return 1
    out = Path(args.out or f"bench/results/kernel_bandwidth_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"card": card, "torch": torch.__version__, "copy_bandwidth_gbps": bandwidth, "shape": shape, "impl": args.impl,
              "inductor": settings, "kernels": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{card}, torch {torch.__version__}, {args.impl} at {args.shape}"
          + (f" (Inductor: {args.inductor})" if settings else "")
          + f": Inductor's kernels a step, each timed alone; device-to-device copy {bandwidth:,.0f} GB/s")
    print(table(rows, args.top))
    print(f"\nwrote {out}")
    if args.code_dir:
        missing = sorted(set(shown) - set(written))
        print(f"wrote the source of {len(written)} kernels to {args.code_dir}"
              + (f"; not found in Inductor's modules: {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
