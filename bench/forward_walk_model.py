"""How far past the ideal the persistent Gluon forward's launch ends, by model, for each way its
programs walk the query tiles (bench/NOTES.md, v20). Needs no GPU.

The model: the query tiles (2 x 64 rows of one head) in the kernels' launch order
(``attention_fwd_ws.tile_order``: each (batch, KV head) chunk's blocks, under a causal mask the last
rows, which see the most keys, first; the group's heads fastest), each costing its 128-key blocks
(``tile_blocks``) + ``--setup`` blocks. Walks:

- ``per_tile``: one program per tile, started on whichever SM frees up first (what the hardware
  does with the one-program-per-tile kernel, ``MGQA_TRITON_FWD_IMPL=tiles``);
- ``strided``: persistent program p takes positions p, p + P, p + 2P, ... (the default);
- ``first_free``: persistent, each program takes its list from ``forward_schedule``
  (``WS_FWD_FIRST_FREE``): the per-tile assignment, made on the host;
- ``snake``: persistent, every other round of P positions assigned in reverse (not built: it evens
  MHA out but unbalances GQA, whose group shares each query block's cost).

"overrun" is the last program's finish over the ideal (total cost / SMs). It ignores L2, the clock and
that the persistent walks hide part of each tile's set-up, so it ranks walks; it does not time them.

    python bench/forward_walk_model.py --kv-heads 8,32 --lengths 4096,16384 --sms 132

Prints a table and writes JSON.
"""

from __future__ import annotations

import heapq
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.launch_model import model_parser, model_shapes  # noqa: E402
from mgqa.kernels import attention as kernels  # noqa: E402

TOKENS = 16384
HEADS = 32


def tile_costs(fwd_ws, batch: int, kv_heads: int, n: int, causal: bool, setup: float) -> list[float]:
    """Cost of each launch-order position (plain order, Nq = Nk = n)."""
    n_tiles = batch * HEADS * -(-n // (2 * fwd_ws.BLOCK_M))
    order = fwd_ws.tile_order(n_tiles, n, HEADS, HEADS // kv_heads, causal, 1, 1)
    return [fwd_ws.tile_blocks(first_row, n, n, causal) + setup for *_, first_row in order]


def walk_finish(fwd_ws, costs: list[float], programs: int, walk: str) -> float:
    """The last program's finish under one walk."""
    if walk == "per_tile":
        free = [(0.0, p) for p in range(programs)]
        for cost in costs:
            time, p = heapq.heappop(free)
            heapq.heappush(free, (time + cost, p))
        return max(time for time, _ in free)
    if walk == "first_free":
        lists = fwd_ws.first_free_schedule(costs, programs)
        return max(sum(costs[position] for position in positions) for positions in lists)
    totals = [0.0] * programs
    for position, cost in enumerate(costs):
        r, q = divmod(position, programs)
        p = programs - 1 - q if walk == "snake" and r % 2 else q
        totals[p] += cost
    return max(totals)


WALKS = ("per_tile", "strided", "first_free", "snake")


def model(fwd_ws, kv_heads: int, n: int, causal: bool, sms: int, setup: float) -> dict:
    batch = max(1, TOKENS // n)
    costs = tile_costs(fwd_ws, batch, kv_heads, n, causal, setup)
    programs = min(sms, len(costs))
    ideal = sum(costs) / programs
    row = {"Hkv": kv_heads, "N": n, "B": batch, "causal": causal, "tiles": len(costs), "programs": programs}
    for walk in WALKS:
        row[f"{walk}_overrun"] = walk_finish(fwd_ws, costs, programs, walk) / ideal - 1.0
    return row


def main() -> int:
    parser = model_parser(__doc__, "1,8,32", "forward_walk_model.json")
    parser.add_argument("--setup", type=float, default=1.0, help="a tile's set-up cost, in key blocks")
    args = parser.parse_args()
    kv_heads, lengths = model_shapes(parser, args)
    if args.setup < 0:
        parser.error(f"--setup must be at least 0, got {args.setup}")
    fwd_ws = kernels._gluon_module("attention_fwd_ws")
    if isinstance(fwd_ws, str):
        parser.error(f"the Gluon forward's host code is needed: {fwd_ws}")
    rows = [model(fwd_ws, h, n, not args.non_causal, args.sms, args.setup) for h in kv_heads for n in lengths]
    print(f"{'Hkv':>4s} {'N':>6s} {'tiles':>6s} | overrun: " + " ".join(f"{walk:>10s}" for walk in WALKS))
    for row in rows:
        print(f"{row['Hkv']:4d} {row['N']:6d} {row['tiles']:6d} |          "
              + " ".join(f"{row[walk + '_overrun']:10.1%}" for walk in WALKS))
    Path(args.json).write_text(json.dumps({"sms": args.sms, "setup_blocks": args.setup, "causal": not args.non_causal,
                                           "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
