"""How fast a kernel can add float32 tiles into a large buffer in global memory (the dQ reduction of a
fused attention backward).

Every program adds ``--steps`` tiles of (BLOCK_M, 128) float32 values into a (rows, 128) buffer (as
large as dQ's float32 accumulator at B=4, H=32, N=4096: 268 MB), each at a different row block, as a
fused backward's programs add their dQ contributions. Ways of issuing the adds:

- ``tl_atomic``: ``tl.atomic_add`` on a pointer tile (relaxed, no return value: ``red`` instructions);
- ``tl_tma_reduce``: one tensor-descriptor ``atomic_add`` per tile (the copy engine's bulk reduce);
- ``gluon_wgmma``: ``gl.atomic_add`` from the register layout of a warpgroup's wgmma accumulator,
  which is where a fused kernel holds its dQ tile;
- ``gluon_blocked``: the same from a blocked layout with 4 consecutive values per thread;
- ``gluon_red_v4``: that layout with sm_90's vector reduction (``red...add.v4.f32``, inline PTX),
  one instruction per 4 values instead of 4.

Each variant is checked (every element of the buffer must equal the number of tiles added to its row
block) and timed with ``triton.testing.do_bench``. Prints payload GB/s and the time the reductions of
one forward+backward would take at the given size, and writes JSON.

    python bench/reduce_throughput.py --json bench/results/reduce_throughput_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HEAD_DIM = 128


@triton.jit
def _row_block(pid, t, n_blocks, PER_HEAD: tl.constexpr, TILES: tl.constexpr):
    """Row block of program pid's step t. PER_HEAD = 0: a walk in a different order per program
    (odd stride: all blocks). Else program pid is key tile pid % TILES of head pid // TILES and walks
    that head's PER_HEAD query blocks, starting at one rotated by its key tile, as a fused backward's
    programs do (programs of one head add into the same rows, at different blocks at a time)."""
    if PER_HEAD == 0:
        blk = (pid * 131 + t * 977) % n_blocks
    else:
        head = pid // TILES
        blk = (head * PER_HEAD + (pid % TILES * (PER_HEAD // TILES) + t) % PER_HEAD) % n_blocks
    return blk


@triton.jit
def _tl_atomic(Acc, n_blocks, steps, BLOCK_M: tl.constexpr, D: tl.constexpr, PER_HEAD: tl.constexpr,
               TILES: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    ones = tl.full([BLOCK_M, D], 1.0, tl.float32)
    for t in range(steps):
        blk = _row_block(pid, t, n_blocks, PER_HEAD, TILES)
        ptrs = Acc + (blk * BLOCK_M + rows).to(tl.int64)[:, None] * D + cols[None, :]
        tl.atomic_add(ptrs, ones, sem="relaxed")


@triton.jit
def _tl_tma_reduce(Acc, n_blocks, steps, BLOCK_M: tl.constexpr, D: tl.constexpr, PER_HEAD: tl.constexpr,
                   TILES: tl.constexpr):
    pid = tl.program_id(0)
    desc = tl.make_tensor_descriptor(Acc, [n_blocks * BLOCK_M, D], [D, 1], [BLOCK_M, D])
    ones = tl.full([BLOCK_M, D], 1.0, tl.float32)
    for t in range(steps):
        blk = _row_block(pid, t, n_blocks, PER_HEAD, TILES)
        desc.atomic_add([blk * BLOCK_M, 0], ones)


# pack=4: outputs $0-$3 (unused), the 4 addresses $4-$7 (consecutive: only the first is used), the
# 4 values $8-$11.
RED_V4_ASM = tl.constexpr("red.global.gpu.relaxed.add.v4.f32 [$4], {$8, $9, $10, $11};\n"
              "mov.u32 $0, 0;\nmov.u32 $1, 0;\nmov.u32 $2, 0;\nmov.u32 $3, 0;")


def _gluon_kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from mgqa.kernels.gluon_common import wgmma_layout

    @gluon.jit
    def _gluon_atomic(Acc, n_blocks, steps, BLOCK_M: gl.constexpr, D: gl.constexpr, PER_HEAD: gl.constexpr,
                      TILES: gl.constexpr, WGMMA: gl.constexpr, RED_V4: gl.constexpr = False):
        if WGMMA:
            layout: gl.constexpr = wgmma_layout(D)
        else:
            layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
        pid = gl.program_id(0)
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
        ones = gl.full([BLOCK_M, D], 1.0, gl.float32, layout)
        for t in range(steps):
            blk = _row_block(pid, t, n_blocks, PER_HEAD, TILES)
            ptrs = Acc + (blk * BLOCK_M + rows).to(gl.int64)[:, None] * D + cols[None, :]
            if RED_V4:  # sm_90's vector reduction: 4 consecutive floats per instruction
                gl.inline_asm_elementwise(RED_V4_ASM, "=r,=r,=r,=r,l,l,l,l,r,r,r,r", [ptrs.to(gl.int64, bitcast=True), ones], gl.int32,
                                          is_pure=False, pack=4)
            else:
                gl.atomic_add(ptrs, ones, sem="relaxed")

    return _gluon_atomic





VARIANTS = ("tl_atomic", "tl_tma_reduce", "gluon_wgmma", "gluon_blocked", "gluon_red_v4")


def launcher(name: str, per_head: int, tiles: int):
    """run(acc, grid, n_blocks, steps, block_m) for variant ``name``."""
    pattern = dict(D=HEAD_DIM, PER_HEAD=per_head, TILES=tiles, num_warps=4)
    if name in ("tl_atomic", "tl_tma_reduce"):
        kernel = _tl_atomic if name == "tl_atomic" else _tl_tma_reduce
        return lambda acc, grid, n_blocks, steps, bm: kernel[(grid,)](acc, n_blocks, steps, BLOCK_M=bm, **pattern)
    kernel = _gluon_kernel()
    wgmma, red_v4 = name == "gluon_wgmma", name == "gluon_red_v4"
    return lambda acc, grid, n_blocks, steps, bm: kernel[(grid,)](acc, n_blocks, steps, BLOCK_M=bm, WGMMA=wgmma,
                                                                    RED_V4=red_v4, **pattern)


def expected_counts(grid: int, steps: int, n_blocks: int, per_head: int, tiles: int) -> torch.Tensor:
    """Tiles added to each row block (``_row_block`` on the host)."""
    pid = torch.arange(grid, device="cuda")[:, None]
    t = torch.arange(steps, device="cuda")[None, :]
    if per_head == 0:
        blk = (pid * 131 + t * 977) % n_blocks
    else:
        blk = (pid // tiles * per_head + (pid % tiles * (per_head // tiles) + t) % per_head) % n_blocks
    counts = torch.zeros(n_blocks, device="cuda")
    return counts.index_add_(0, blk.flatten(), torch.ones(grid * steps, device="cuda"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4 * 32 * 4096, help="rows of the float32 buffer (B*H*N)")
    parser.add_argument("--block-m", type=int, nargs="+", default=[64], help="rows per tile")
    parser.add_argument("--programs-per-sm", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="tiles per program")
    parser.add_argument("--tiles-per-call", type=float, default=135168,
                        help="(64-row) tiles one forward+backward adds (Hkv=8 or MHA, D=128, 4k causal: 135168)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--pattern", choices=("random", "heads"), nargs="+", default=["random", "heads"],
                        help="random: every program walks the whole buffer; heads: a fused backward's walk "
                             "(program = key tile of a head, N=4096: 32 key tiles of 128, query blocks of the "
                             "head from a rotated start), so the rows in use at a time fit in L2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    if not torch.cuda.is_available():
        print("bench/reduce_throughput.py needs a CUDA GPU", file=sys.stderr)
        return 2
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = sms * args.programs_per_sm
    rows_out = []
    print(f"{'variant':>14} {'pattern':>8} {'BLOCK_M':>7} {'GB/s':>8} {'µs per call':>12} {'check':>6}")
    for pattern, bm in [(p, b) for p in args.pattern for b in args.block_m]:
        n_blocks = args.rows // bm
        per_head, tiles = (4096 // bm, 32) if pattern == "heads" else (0, 1)
        acc = torch.zeros((n_blocks * bm, HEAD_DIM), dtype=torch.float32, device="cuda")
        expected = expected_counts(grid, args.steps, n_blocks, per_head, tiles)
        for name in variants:
            run = launcher(name, per_head, tiles)
            row = {"variant": name, "pattern": pattern, "BLOCK_M": bm, "programs": grid, "steps": args.steps}
            try:
                acc.zero_()
                run(acc, grid, n_blocks, args.steps, bm)
                row["correct"] = bool(torch.equal(acc.view(n_blocks, -1), expected[:, None].expand(-1, bm * HEAD_DIM)))
                ms = triton.testing.do_bench(lambda: run(acc, grid, n_blocks, args.steps, bm), warmup=10, rep=50)
                payload = grid * args.steps * bm * HEAD_DIM * 4
                row["GB_per_s"] = payload / ms / 1e6
                row["us_per_call"] = args.tiles_per_call * 64 * HEAD_DIM * 4 / (row["GB_per_s"] * 1e3)
            except Exception as exc:  # one variant failing (e.g. an API missing) must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows_out.append(row)
            if "error" in row:
                print(f"{name:>14} {pattern:>8} {bm:>7} error: {row['error'][:100]}")
            else:
                print(f"{name:>14} {pattern:>8} {bm:>7} {row['GB_per_s']:>8.0f} {row['us_per_call']:>12.0f} "
                      f"{'ok' if row['correct'] else 'WRONG':>6}")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "rows": args.rows, "tiles_per_call": args.tiles_per_call}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
