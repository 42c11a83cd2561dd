"""Experiment: a Gluon (Triton's lower-level dialect) forward kernel that overlaps the softmax of key
block j with the P·V matmul of block j-1 inside one warpgroup, as FlashAttention-3 does.

Plain ``tl`` code cannot express this in Triton 3.6: the compiler waits for every non-accumulating
matmul right after issuing it (bench/NOTES.md, v5), and writing the loop one block ahead (v6) made
ptxas serialise the matmuls. Gluon issues ``wgmma`` asynchronously and waits where the code says.
This is a measurement, not a production kernel: non-causal only, lengths a multiple of the blocks,
head_dim 64 or 128, bf16/fp16, contiguous (B, H, N, D) inputs.

    python bench/gluon_attention.py --compile-only [--ptx-dir DIR]   # no GPU: sm_90 PTX + ptxas report
    python bench/gluon_attention.py --json bench/results/gluon_attention.json   # H100: check and time

``--compile-only`` compiles each variant for sm_90 and runs ptxas on it, reporting registers, spills
and any warning that ptxas serialised the ``wgmma`` instructions (what sank v6). On a GPU every
variant is checked against SDPA and timed next to mgqa's Triton forward and SDPA flash, in the same
process; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

TOKENS = 16384
HEADS = 32


@gluon.jit
def _load_kv(k_desc, v_desc, k_smem, v_smem, bars, row, stage, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr):
    bar = bars.index(stage)
    mbarrier.expect(bar, 2 * BLOCK_N * HEAD_DIM * k_desc.dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(k_desc, [row, 0], bar, k_smem.index(stage))
    tma.async_copy_global_to_shared(v_desc, [row, 0], bar, v_smem.index(stage))


@gluon.jit
def _attn_fwd_gluon(
    Q, K, V, Out, n_ctx, heads, GROUP, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    OVERLAP: gl.constexpr, num_warps: gl.constexpr,
):
    """One program: BLOCK_M query rows of one head, all keys (no mask). OVERLAP=1 issues S_j = Q K_j^T
    and O += P_{j-1} V_{j-1} together, waits for S_j only, runs block j's softmax while the P·V
    matmul runs, then waits for it; OVERLAP=0 waits after each matmul (what Triton 3.6 emits)."""
    dtype: gl.constexpr = Q.dtype.element_ty
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    kv_bh = batch * (heads // GROUP) + head // GROUP
    num_n = n_ctx // BLOCK_N

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    # Q, K, V as 2-D (rows, head_dim) tensors: row (b*H + h)*N + i.
    q_desc = tma.make_tensor_descriptor(Q, [gl.num_programs(1) * n_ctx, HEAD_DIM], [HEAD_DIM, 1],
                                        [BLOCK_M, HEAD_DIM], q_layout)
    kv_rows = gl.num_programs(1) // GROUP * n_ctx
    k_desc = tma.make_tensor_descriptor(K, [kv_rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM], kv_layout)
    v_desc = tma.make_tensor_descriptor(V, [kv_rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_N, HEAD_DIM], kv_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * dtype.primitive_bitwidth // 8)
    tma.async_copy_global_to_shared(q_desc, [pid_bh * n_ctx + pid_m * BLOCK_M, 0], q_bar, q_smem)
    kv_row0 = kv_bh * n_ctx
    for i in gl.static_range(STAGES):  # the launcher guarantees num_n >= STAGES
        _load_kv(k_desc, v_desc, k_smem, v_smem, bars, kv_row0 + i * BLOCK_N, i, BLOCK_N, HEAD_DIM)
    mbarrier.wait(q_bar, 0)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_s)

    # Block 0: scores and softmax, no P·V yet.
    mbarrier.wait(bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    for j in range(1, num_n):
        stage = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(bars.index(stage), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        if OVERLAP:
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))  # S_j ready; P_{j-1} V_{j-1} may still run
        else:
            s = warpgroup_mma_wait(0, deps=(s,))
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        if OVERLAP:
            acc = warpgroup_mma_wait(0, deps=(acc,))
        # Stage `prev` is free once P_{j-1} V_{j-1} is done: refill it STAGES blocks ahead.
        if j - 1 + STAGES < num_n:
            _load_kv(k_desc, v_desc, k_smem, v_smem, bars, kv_row0 + (j - 1 + STAGES) * BLOCK_N, prev, BLOCK_N,
                     HEAD_DIM)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    acc = warpgroup_mma(p_op, v_smem.index((num_n - 1) % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    out = acc / gl.convert_layout(l_i, row_o)[:, None]
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    ptrs = Out + (pid_bh * n_ctx + offs_m).to(gl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    gl.store(ptrs, out.to(dtype))


# name: (BLOCK_M, BLOCK_N, STAGES, OVERLAP, warps)
VARIANTS = {
    "overlap_128x64_w4": (128, 64, 2, 1, 4),
    "serial_128x64_w4": (128, 64, 2, 0, 4),
    "overlap_64x128_w4": (64, 128, 2, 1, 4),
    "overlap_128x128_w8": (128, 128, 2, 1, 8),
}


def compile_only(ptx_dir: Path | None, head_dim: int) -> int:
    """Compile every variant for sm_90, run ptxas, report registers, spills and wgmma serialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    failed = 0
    print(f"triton {triton.__version__}, sm_90, head_dim {head_dim}, bf16")
    base = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "n_ctx": "i32", "heads": "i32",
            "GROUP": "i32", "qk_scale": "fp32"}
    builds = []
    for name, (bm, bn, stages, overlap, warps) in VARIANTS.items():
        constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, "STAGES": stages, "OVERLAP": overlap,
                      "num_warps": warps}
        builds.append((name, _attn_fwd_gluon, constexprs, {"num_warps": warps}))
    for name, fn, constexprs, options in builds:
        signature = dict(base, **{key: "constexpr" for key in constexprs})
        try:
            kernel = triton.compile(GluonASTSource(fn, signature, constexprs),
                                    target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as err:
            failed += 1
            print(f"{name:22s} FAILED: {type(err).__name__}: {str(err)[:600]}")
            continue
        ptx = kernel.asm["ptx"]
        path = (ptx_dir or Path("/tmp")) / f"gluon_{name}.ptx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(ptx)
        report = ""
        if ptxas.is_file():
            proc = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(path), "-o", str(path.with_suffix(".cubin"))],
                                  capture_output=True, text=True)
            report = proc.stdout + proc.stderr
        regs = re.search(r"Used (\d+) registers", report)
        spills = re.search(r"(\d+) bytes spill stores", report)
        serial = [line.strip() for line in report.splitlines() if "wgmma" in line.lower()]
        waits = sorted(set(re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)))
        print(f"{name:22s} shared {kernel.metadata.shared:6d} B, wgmma {ptx.count('wgmma.mma_async'):3d}, "
              f"wait_group {waits}, "
              f"registers {regs.group(1) if regs else '?'}, spill stores {spills.group(1) if spills else '?'} B")
        for line in serial:
            print(f"    ptxas: {line[:300]}")
    return 1 if failed else 0


def gluon_forward(q, k, v, variant: str):
    import torch

    batch, heads, n, head_dim = q.shape
    out = torch.empty_like(q)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    bm, bn, stages, overlap, warps = VARIANTS[variant]
    if n % bm or n % bn or n // bn < stages:
        raise ValueError(f"length {n} must be a multiple of {bm} and {bn}")
    _attn_fwd_gluon[(n // bm, batch * heads)](
        q, k, v, out, n, heads, heads // k.shape[1], 1.0 / math.sqrt(head_dim) * math.log2(math.e),
        HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages, OVERLAP=overlap, num_warps=warps,
    )
    return out


def warp_specialised_forward(q, k, v):
    import torch

    from mgqa.kernels import attention_fwd_ws

    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    attention_fwd_ws.launch(q, k, v, out, lse, False, 1.0 / math.sqrt(q.shape[-1]) * math.log2(math.e))
    return out


def bench_gpu(json_path: str) -> None:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mgqa.kernels import attention as mgqa_kernels

    rows = []
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), tokens=TOKENS, heads=HEADS, dtype="bfloat16", causal=False,
                units="TFLOP/s forward, 4*B*H*N^2*D")
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, bf16, non-causal, forward TFLOP/s")
    for head_dim, kv_heads, n in [(128, 8, 4096), (128, 8, 8192), (128, 32, 4096), (64, 8, 4096)]:
        batch = TOKENS // n
        gen = dict(device="cuda", dtype=torch.bfloat16)
        q = torch.randn(batch, HEADS, n, head_dim, **gen)
        k = torch.randn(batch, kv_heads, n, head_dim, **gen)
        v = torch.randn(batch, kv_heads, n, head_dim, **gen)
        flops = 4 * batch * HEADS * n * n * head_dim
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        impls = {"mgqa_triton": lambda: mgqa_kernels.triton_attention(q, k, v, causal=False)}
        for name in VARIANTS:
            impls[f"gluon_{name}"] = (lambda name=name: gluon_forward(q, k, v, name))
        # What v11 grew out of this experiment: the warp-specialised forward mgqa runs on sm_90.
        impls["mgqa_gluon_ws"] = lambda: warp_specialised_forward(q, k, v)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        impls["sdpa_flash"] = flash
        row = dict(B=batch, H=HEADS, Hkv=kv_heads, N=n, D=head_dim)
        for name, fn in impls.items():
            try:
                out = fn()
                row[f"{name}_err"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                readings = sorted(flops / triton.testing.do_bench(fn, warmup=10, rep=60) / 1e9 for _ in range(3))
                row[name] = readings[1]
            except Exception as err:
                row[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        rows.append(row)
        print(f"D={head_dim} Hkv={kv_heads} N={n}: " + " ".join(
            f"{name}={row[name]:.0f} (err {row[name + '_err']:.1e})" if name in row else f"{name}=ERROR"
            for name in impls), flush=True)
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90 and run ptxas; no GPU needed")
    parser.add_argument("--ptx-dir", type=Path, default=None, help="with --compile-only: keep the PTX here")
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128], help="with --compile-only")
    parser.add_argument("--json", default="gluon_attention.json", help="where to write the GPU results")
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.ptx_dir, args.head_dim)
    bench_gpu(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
