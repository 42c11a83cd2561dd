"""Compile mgqa's attention kernels for a GPU architecture on a machine without a GPU.

    python -m mgqa.kernels.compile_check [--arch 90] [--ptx-dir DIR] [--only PREFIX]

Triton's interpreter (how CI runs the kernels on CPU) accepts code the real compiler refuses, and
says nothing about the instructions a kernel becomes. This compiles the plain-Triton forward, dQ
and dK/dV kernels (head_dim 128, bf16, causal and not, pointer and tensor-descriptor loads, each
with the plan's first tile config), the decode kernels and, for sm_90, the Gluon kernels as the
default plan runs them (``plan.plan_attention`` on an H100: the persistent forward, strided and with
first-free tile lists; dQ; dK/dV per key tile with 1 and 2 group splits, and persistent) to PTX.
It reports, per variant, the shared memory, the Hopper matrix instructions (``wgmma``), the bulk
tensor copies (TMA) and, where Triton's ptxas is installed, the bytes of register spills and
whether ptxas serialised the ``wgmma`` instructions. Exit status 1 if a variant fails to compile,
if for sm_90 one uses no wgmma, if a Gluon kernel has its matrix instructions serialised, or if the
Gluon forward or dQ kernel or a decode kernel spills.
Needs Triton's NVIDIA backend (bundled with the Linux wheels) and must run with
``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mgqa.kernels import decode, plan, tl_dkdv, tl_dq, tl_fwd

FLOAT_ARGS = ("qk_scale", "sm_scale")
INT_ARGS_UPPER = ("N_BUCKET", "GROUP", "SPLITS", "SECTION_PROGRAMS", "SECTION_CHUNKS")  # runtime integers despite their names
FP32_POINTERS = ("Lse", "Delta", "PartOut", "PartLse")
INT32_POINTERS = ("Schedule", "Rounds", "Lengths")  # the persistent kernels' tile lists; decode lengths
# What the Gluon variants are planned for: an H100 (132 SMs, 50 MB of L2), bf16, 4 x 4k tokens of 16
# query heads, GQA (4 KV heads: dK/dV per key tile) and MHA (dK/dV persistent).
H100 = plan.DeviceProps(capability=(9, 0), sms=132, l2_bytes=50 * 2**20)
GLUON_PREFIX = "gluon"


def _constexpr_defaults(fn) -> dict:
    """The kernel's constexpr parameters that have defaults (e.g. ONE_LOOP=False), so that a
    variant leaving them out compiles what a launch leaving them out runs."""
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation)}


def _signature(jit_fn, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in inspect.signature(jit_fn.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in INT_ARGS_UPPER:
            split_partial = name in ("DK", "DV") and constexprs.get("SPLITS", 1) > 1  # float32 partials
            sig[name] = ("*fp32" if name in FP32_POINTERS or split_partial else "*i32" if name in INT32_POINTERS
                         else "*bf16")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _aligned_attrs(jit_fn, constexprs: dict) -> dict:
    """Triton's launch-time specialisation for 16-divisible pointers and strides (what a real launch
    on a contiguous cache with head_dim 128 gets); without it loads are not vectorised, so no
    asynchronous copies and no software pipelining show in the PTX."""
    names = list(inspect.signature(jit_fn.fn).parameters)
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
            if n not in constexprs and (n[0].isupper() or n.startswith("stride"))}


def variants():
    """(name, jit function, constexprs, launch options) of every plain-Triton variant compiled."""
    for use_tma in (0, 1):
        for causal in (0, 1):
            common = {"HEAD_DIM": 128, "BLOCK_D": 128, "CAUSAL": causal, "INPUT_PRECISION": "ieee", "USE_TMA": use_tma}
            tag = f"tma={use_tma} causal={causal}"
            # Each kernel's first (default) tile config for bf16 at head_dim 128.
            for name, fn, kind, extra in [
                ("fwd ", tl_fwd._attn_fwd, "fwd", {}),
                ("dq  ", tl_dq._attn_bwd_dq, "dq", {}),
                ("dkdv", tl_dkdv._attn_bwd_dkdv, "dkdv", {}),
                # One query loop per head, flattened with the head loop (what MHA shapes run).
                ("dkdv1", tl_dkdv._attn_bwd_dkdv, "dkdv", {"ONE_LOOP": 1, "FLATTEN": 1}),
            ]:
                tiles = plan.tl_configs(kind, 128, 2, interpreter=False)[0]
                constexprs = {**_constexpr_defaults(fn.fn), **common, **extra, "BLOCK_M": tiles.block_m,
                              "BLOCK_N": tiles.block_n}
                yield f"{name} {tag}", fn, constexprs, {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    yield from decode_variants()


def decode_variants():
    """The decode kernel (GQA group of 4 and MQA's 32 heads, one query and eight, split and not) and
    its combine, with the launch settings ``decode_attention`` picks for bf16."""
    for group, n_q in ((4, 1), (32, 1), (4, 8)):
        for one_split in (0, 1):
            tiles = plan.decode_tiles(128, group * n_q, "bfloat16", H100)
            constexprs = {"GROUP": group, "N_Q": n_q, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": tiles.block_m,
                          "CAUSAL": 1, "ONE_SPLIT": one_split, "INPUT_PRECISION": "tf32", "BLOCK_N": tiles.block_n}
            yield (f"dec g={group} nq={n_q} split={1 - one_split}", decode._decode_split, constexprs,
                   {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    yield "dec combine", decode._decode_combine, {"N_Q": 1, "HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_S": 64}, \
        {"num_warps": 4}


def gluon_variants():
    """The Gluon kernels (sm_90 only) as the default plan runs them, causal and not: the persistent
    forward with strided and first-free tile lists, dQ, dK/dV per key tile with 1 and 2 group splits
    (GQA), and the persistent dK/dV (MHA)."""
    from mgqa.kernels import gluon_dkdv, gluon_dkdv_persistent, gluon_dq, gluon_fwd  # noqa: PLC0415 (needs Gluon)
    from mgqa.kernels.gluon_common import CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS  # noqa: PLC0415

    options = {"num_warps": NUM_WARPS, "maxnreg": MAXNREG}
    for causal in (0, 1):
        gqa = plan.plan_attention(4, 16, 4, 4096, 4096, 128, "bfloat16", bool(causal), 0.088, H100)
        mha = plan.plan_attention(4, 16, 16, 4096, 4096, 128, "bfloat16", bool(causal), 0.088, H100)
        assert (gqa.forward.kernel, gqa.dq.kernel, gqa.dkdv.kernel, mha.dkdv.kernel) == \
            ("gluon_persistent", "gluon", "gluon", "gluon_persistent"), (gqa.describe(), mha.describe())

        def constexprs(p, **extra):
            return {"HEAD_DIM": 128, "BLOCK_M": p.tiles.block_m, "BLOCK_N": p.tiles.block_n,
                    "STAGES": p.tiles.num_stages, "CAUSAL": causal, "CONSUMER_REGS": CONSUMER_REGS,
                    "PRODUCER_REGS": PRODUCER_REGS, **extra}

        tag = f"tma=1 causal={causal}"
        for first_free, name in ((False, "gluon_fwd"), (True, "gluon_fwd_ff")):
            yield f"{name} {tag}", gluon_fwd._attn_fwd_ws_persistent, constexprs(gqa.forward, SCHEDULED=first_free), \
                options
        yield f"gluon_dq {tag}", gluon_dq._attn_bwd_dq_ws, constexprs(gqa.dq), options
        for splits, name in ((1, "gluon_dkdv"), (2, "gluon_dkdv_s2")):
            yield f"{name} {tag}", gluon_dkdv._attn_bwd_dkdv_ws, \
                constexprs(gqa.dkdv, PREFETCH=gqa.dkdv.tiles.prefetch, SPLITS=splits), options
        yield f"gluon_dkdv_p {tag}", gluon_dkdv_persistent._attn_bwd_dkdv_ws_persistent, \
            constexprs(mha.dkdv, PREFETCH=mha.dkdv.tiles.prefetch, KV_SETS=mha.dkdv.tiles.kv_sets), options


def _ptxas_report(ptx: str) -> tuple[str, str]:
    """(spill bytes, 'yes'/'no' wgmma serialised) from Triton's bundled ptxas, or ('-', '-')."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = re.search(r"\.target (sm_\w+)", ptx)
    if not ptxas.is_file() or arch is None:
        return "-", "-"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(ptxas), f"-arch={arch.group(1)}", "-v", str(src), "-o", str(src.with_suffix(".o"))],
                              capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))
    return str(spills), "yes" if "wgmma.mma_async instructions are serialized" in report else "no"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--ptx-dir", type=Path, default=None, help="also write each variant's PTX here")
    parser.add_argument("--only", default=None, help="compile only the variants whose name starts with this, e.g. dec")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'variant':28s} {'shared B':>9s} {'wgmma':>6s} {'TMA':>4s} {'spill B':>8s} {'serialised':>10s}")
    builds = list(variants())
    if args.arch == 90:
        builds += list(gluon_variants())
    if args.only is not None:
        builds = [b for b in builds if b[0].startswith(args.only)]
        if not builds:
            parser.error(f"--only {args.only!r} matches no variant")
    for name, fn, constexprs, options in builds:
        try:
            if name.startswith(GLUON_PREFIX):
                from triton.experimental.gluon._runtime import GluonASTSource  # noqa: PLC0415

                source = GluonASTSource(fn, _signature(fn, constexprs), constexprs)
            else:
                attrs = _aligned_attrs(fn, constexprs) if name.startswith("dec") else None
                source = ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs, attrs=attrs)
            kernel = triton.compile(source, target=target, options=options)
        except Exception as err:  # report every variant, then fail
            failed += 1
            print(f"{name:28s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        ptx = kernel.asm["ptx"]
        wgmma, tma = ptx.count("wgmma.mma_async"), ptx.count("cp.async.bulk.tensor")
        spills, serialised = _ptxas_report(ptx)
        # Decode is bound by memory and its tiles hold at most 64 query rows: mma.sync (or no matrix
        # instruction, for the combine) is what it should use.
        if args.arch >= 90 and wgmma == 0 and not name.startswith("dec"):
            failed += 1
            name += " (no wgmma)"
        if name.startswith(GLUON_PREFIX) and serialised == "yes":
            failed += 1
            name += " (serialised)"
        if name.startswith(("gluon_fwd", "gluon_dq", "dec")) and spills not in ("0", "-"):
            failed += 1
            name += " (spills)"
        print(f"{name:28s} {kernel.metadata.shared:9d} {wgmma:6d} {tma:4d} {spills:>8s} {serialised:>10s}")
        if args.ptx_dir is not None:
            args.ptx_dir.mkdir(parents=True, exist_ok=True)
            (args.ptx_dir / ("_".join(name.split(" (")[0].split()).replace("=", "") + ".ptx")).write_text(ptx)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
