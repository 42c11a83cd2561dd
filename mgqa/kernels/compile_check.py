"""Compile mgqa's attention kernels for a GPU architecture on a machine without a GPU.

    python -m mgqa.kernels.compile_check [--arch 90] [--ptx-dir DIR]

Triton's interpreter (how CI runs the kernels on CPU) accepts code the real compiler refuses, and
says nothing about the instructions a kernel becomes. This compiles the forward, dQ and dK/dV
kernels (head_dim 128, bf16, causal and not, pointer and tensor-descriptor loads) to PTX and
reports, per variant, the shared memory, the Hopper matrix instructions (``wgmma``) and the bulk
tensor copies (TMA). Exit status 1 if a variant fails to compile or, for sm_90, uses no wgmma.
Needs Triton's NVIDIA backend (bundled with the Linux wheels) and must run with
``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mgqa.kernels import attention_bwd, attention_fwd

FLOAT_ARGS = ("qk_scale", "sm_scale")
INT_ARGS_UPPER = ("N_BUCKET", "GROUP", "SPLITS", "SECTION_PROGRAMS", "SECTION_CHUNKS")  # runtime integers despite their names
FP32_POINTERS = ("Lse", "Delta", "DQ_ACC")


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
            sig[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def variants():
    """(name, jit function, constexprs, num_warps, num_stages) of every variant compiled."""
    for use_tma in (0, 1):
        for causal in (0, 1):
            common = {"HEAD_DIM": 128, "BLOCK_D": 128, "CAUSAL": causal, "INPUT_PRECISION": "ieee", "USE_TMA": use_tma}
            tag = f"tma={use_tma} causal={causal}"
            # Each kernel's first (default) launch configuration.
            for name, fn, extra, cfg in [
                ("fwd ", attention_fwd._attn_fwd.fn, {"SOFTMAX": 0}, attention_fwd.GPU_CONFIGS[0]),
                ("dq  ", attention_bwd._attn_bwd_dq.fn, {}, attention_bwd.DQ_GPU_CONFIGS[0]),
                ("dkdv", attention_bwd._attn_bwd_dkdv_kernel, {"ATOMIC_DQ": 0}, attention_bwd.DKDV_GPU_CONFIGS[0]),
                # One query loop per head, flattened with the head loop (what MHA shapes run).
                ("dkdv1", attention_bwd._attn_bwd_dkdv_kernel, {"ATOMIC_DQ": 0, "ONE_LOOP": 1, "FLATTEN": 1},
                 attention_bwd.DKDV_GPU_CONFIGS[0]),
            ]:
                constexprs = {**_constexpr_defaults(fn.fn), **common, **extra, **cfg.kwargs}
                yield f"{name} {tag}", fn, constexprs, cfg.num_warps, cfg.num_stages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--ptx-dir", type=Path, default=None, help="also write each variant's PTX here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'variant':24s} {'shared B':>9s} {'wgmma':>6s} {'TMA':>4s}")
    for name, fn, constexprs, warps, stages in variants():
        try:
            kernel = triton.compile(
                ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs),
                target=target,
                options={"num_warps": warps, "num_stages": stages},
            )
        except Exception as err:  # report every variant, then fail
            failed += 1
            print(f"{name:24s} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        ptx = kernel.asm["ptx"]
        wgmma, tma = ptx.count("wgmma.mma_async"), ptx.count("cp.async.bulk.tensor")
        if args.arch >= 90 and wgmma == 0:
            failed += 1
            name += " (no wgmma)"
        print(f"{name:24s} {kernel.metadata.shared:9d} {wgmma:6d} {tma:4d}")
        if args.ptx_dir is not None:
            args.ptx_dir.mkdir(parents=True, exist_ok=True)
            (args.ptx_dir / ("_".join(name.split(" (")[0].split()).replace("=", "") + ".ptx")).write_text(ptx)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
