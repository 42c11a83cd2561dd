"""How far past the ideal the Gluon dK/dV kernel's launch ends, by model, for each way of splitting
the query group: the model behind the launcher's split and section rules (bench/NOTES.md, v19).
Needs no GPU.

The model: each key tile is one program costing (heads per program) x (its query steps) +
TILE_SETUP_STEPS; programs start in the launcher's order (sections of chunks, each section's longest
tiles first) on whichever SM frees up first, which is what the hardware does with one program per
SM and what the persistent kernel's host-made schedule does. "overrun" is the last SM's finish over
the ideal (total cost / SMs). It ignores L2 and the clock, so it ranks launch orders; it does not time
them. Sections are shown as the launcher makes them (even) and as it made them before v19 (ragged:
as many chunks as fit in L2, the last section short).

    python bench/launch_model.py --kv-heads 1,8,32 --lengths 4096,16384 --sms 132 --l2-mb 50

Prints a table (the launcher's pick marked) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.attention import int_list  # noqa: E402
from mgqa.kernels import attention as kernels  # noqa: E402

TOKENS = 16384
HEADS = 32


def model_parser(doc: str, kv_heads: str, json_default: str) -> argparse.ArgumentParser:
    """The arguments the launch models share: --kv-heads, --lengths, --sms, --non-causal, --json."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-heads", default=kv_heads, help=f"comma-separated, each dividing {HEADS}")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384",
                        help=f"comma-separated sequence lengths (batch = {TOKENS} // N)")
    parser.add_argument("--sms", type=int, default=132, help="SM count (H100 and H200 SXM: 132)")
    parser.add_argument("--non-causal", action="store_true", help="model the unmasked launch (plain order)")
    parser.add_argument("--json", default=json_default, help="where to write the rows")
    return parser


def model_shapes(parser: argparse.ArgumentParser, args) -> tuple[list[int], list[int]]:
    """(KV head counts, lengths) of ``model_parser``'s arguments, checked; a clear error otherwise."""
    kv_list = int_list(parser, "kv-heads", args.kv_heads)
    lengths = int_list(parser, "lengths", args.lengths)
    bad = [kv for kv in kv_list if HEADS % kv]
    if bad:
        parser.error(f"--kv-heads {args.kv_heads!r}: {bad} do not divide {HEADS}")
    if args.sms < 1:
        parser.error(f"--sms must be at least 1, got {args.sms}")
    return kv_list, lengths


def overrun(costs: list[float], sms: int, ws) -> float:
    """The last SM's finish over the ideal, minus 1, with programs started first-free in order."""
    lists = ws.first_free_schedule(costs, sms)
    finish = max(sum(costs[position] for position in positions) for positions in lists)
    return finish / (sum(costs) / sms) - 1.0


def model(ws, kv_heads: int, n: int, causal: bool, sms: int, l2_bytes: int, head_dim: int, max_splits: int) -> list:
    """One row per power-of-two split of the group, up to ``max_splits``."""
    batch = max(1, TOKENS // n)
    group = HEADS // kv_heads
    num_n = triton.cdiv(n, 2 * ws.BLOCK_N)
    pick = kernels.ws_dkdv_splits(ws, batch, kv_heads, n, group, sms, causal, kernels.WS_BWD_MAX_SPLITS)
    rows = []
    splits = 1
    while splits <= min(group, max_splits):
        chunks = batch * kv_heads * splits
        chunk_bytes = 2 * (group // splits) * n * head_dim * 2  # Q and dO of one split, 16-bit
        steps = [(group // splits) * ws.tile_steps(pid_n, n, n, causal) + ws.TILE_SETUP_STEPS
                 for pid_n in range(num_n)]
        row = dict(Hkv=kv_heads, N=n, B=batch, causal=causal, splits=splits, programs=chunks * num_n,
                   picked=splits == pick)
        for name, even in (("even", True), ("ragged", False)):
            if causal:
                sections = kernels.section_sizes(chunk_bytes, sms, l2_bytes, chunks, num_n, even)
            else:
                sections = dict(SECTION_PROGRAMS=1, SECTION_CHUNKS=1)
            order = ws.launch_order(num_n, chunks, sections["SECTION_PROGRAMS"], sections["SECTION_CHUNKS"])
            row[f"section_chunks_{name}"] = max(min(triton.cdiv(sections["SECTION_PROGRAMS"], num_n),
                                                    sections["SECTION_CHUNKS"]), 1)
            row[f"overrun_{name}"] = overrun([steps[pid_n] for _, pid_n in order], sms, ws)
        rows.append(row)
        splits *= 2
    return rows


def main() -> int:
    parser = model_parser(__doc__, "1,2,4,8,16,32", "launch_model.json")
    parser.add_argument("--l2-mb", type=float, default=50.0, help="L2 size in MiB (H100: 50, H200: 60)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--max-splits", type=int, default=32, help="largest split to model")
    args = parser.parse_args()
    kv_list, lengths = model_shapes(parser, args)
    for name, value in (("head-dim", args.head_dim), ("max-splits", args.max_splits)):
        if value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.l2_mb <= 0:
        parser.error(f"--l2-mb must be positive, got {args.l2_mb}")
    ws = kernels._gluon_module("attention_bwd_ws")
    if isinstance(ws, str):
        print(f"bench/launch_model.py needs the Gluon dK/dV module: {ws}", file=sys.stderr)
        return 2

    rows = []
    print(f"{'Hkv':>4} {'N':>6} {'B':>3} {'splits':>6} {'programs':>8} | {'chunks/section':>15} | "
          f"{'overrun even':>12} {'ragged':>7}")
    for kv_heads in kv_list:
        for n in lengths:
            for row in model(ws, kv_heads, n, not args.non_causal, args.sms, int(args.l2_mb * 2 ** 20),
                             args.head_dim, args.max_splits):
                rows.append(row)
                mark = "  <- launcher" if row["picked"] else ""
                print(f"{row['Hkv']:>4} {row['N']:>6} {row['B']:>3} {row['splits']:>6} {row['programs']:>8} | "
                      f"{row['section_chunks_even']:>7} / {row['section_chunks_ragged']:<5} | "
                      f"{100 * row['overrun_even']:>11.1f}% {100 * row['overrun_ragged']:>6.1f}%{mark}")
    meta = dict(sms=args.sms, l2_mb=args.l2_mb, head_dim=args.head_dim, tokens=TOKENS, heads=HEADS,
                causal=not args.non_causal, tile_setup_steps=ws.TILE_SETUP_STEPS)
    Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
