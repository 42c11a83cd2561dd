"""The query-block launch order the forward and dQ kernels share (attention_common), and the walks of
the persistent Gluon forward over it: program p takes positions p, p + P, p + 2P, ... (strided), or
the positions of its first-free list made on the host (``attention_fwd_ws.forward_schedule``), and
decodes each with ``_query_block_at``, so together the programs compute every query block exactly
once, as the one-program-per-block launch does."""

import pytest
import torch
import triton
import triton.language as tl

from mgqa.kernels.attention_common import _query_block_at, _query_block_program

fwd_ws = pytest.importorskip("mgqa.kernels.attention_fwd_ws", reason="Gluon unavailable in this Triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _record_grid(Out, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_M: tl.constexpr,
                 CAUSAL: tl.constexpr):
    batch, kv_head, member, start_m = _query_block_program(n_q, heads, GROUP, BLOCK_M, CAUSAL, SECTION_PROGRAMS,
                                                           SECTION_CHUNKS)
    row = Out + 4 * tl.program_id(0)
    tl.store(row, batch)
    tl.store(row + 1, kv_head)
    tl.store(row + 2, member)
    tl.store(row + 3, start_m)


@triton.jit
def _record_tile(Out, Count, tile, n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS,
                 BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    batch, kv_head, member, start_m = _query_block_at(tile, n_tiles, n_q, heads, GROUP, BLOCK_M, CAUSAL,
                                                      SECTION_PROGRAMS, SECTION_CHUNKS)
    row = Out + 4 * tile
    tl.store(row, batch)
    tl.store(row + 1, kv_head)
    tl.store(row + 2, member)
    tl.store(row + 3, start_m)
    tl.atomic_add(Count + tile, 1)


@triton.jit
def _record_walk(Out, Count, Schedule, Rounds, max_rounds, n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS,
                 SECTION_CHUNKS, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, SCHEDULED: tl.constexpr):
    if SCHEDULED:  # as attention_fwd_ws._pfwd_producer and _pfwd_consume walk
        row = Schedule + tl.program_id(0) * max_rounds
        for r in range(tl.load(Rounds + tl.program_id(0))):
            _record_tile(Out, Count, tl.load(row + r), n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS,
                         BLOCK_M, CAUSAL)
    else:
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _record_tile(Out, Count, tile, n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_M,
                         CAUSAL)


CASES = [
    (2, 8, 4, 300, True, (1, 1), 3),  # GQA, ragged last block, plain order
    (1, 4, 1, 256, False, (1, 1), 5),  # MHA, more programs than some walk
    (3, 6, 2, 200, True, (1 << 30, 2), 4),  # sections of two chunks, the last one short
    (1, 2, 2, 64, True, (1, 1), 7),  # fewer tiles than programs
]


@pytest.mark.parametrize("scheduled", [False, True], ids=["strided", "first_free"])
@pytest.mark.parametrize("batch,heads,group,n_q,causal,sections,programs", CASES)
def test_persistent_walk_covers_the_launch_order_once(batch, heads, group, n_q, causal, sections, programs,
                                                      scheduled):
    block_m = 2 * fwd_ws.BLOCK_M
    n_tiles = batch * heads * triton.cdiv(n_q, block_m)
    programs = min(programs, n_tiles)
    grid = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    _record_grid[(n_tiles,)](grid, n_q, heads, group, *sections, BLOCK_M=block_m, CAUSAL=causal)
    section_dict = dict(SECTION_PROGRAMS=sections[0], SECTION_CHUNKS=sections[1])
    schedule, rounds = fwd_ws.forward_schedule(batch, heads, heads // group, n_q, n_q, causal, programs, section_dict,
                                               DEVICE)
    walk = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    count = torch.zeros(n_tiles, dtype=torch.int32, device=DEVICE)
    _record_walk[(programs,)](walk, count, schedule, rounds, schedule.shape[1], n_tiles, n_q, heads, group,
                              *sections, BLOCK_M=block_m, CAUSAL=causal, SCHEDULED=scheduled)
    assert count.tolist() == [1] * n_tiles
    assert torch.equal(walk, grid)
    # The host's copy of the order is the kernels'; every (batch, KV head, member, query block) once.
    order = fwd_ws.tile_order(n_tiles, n_q, heads, group, causal, *sections)
    assert [tuple(row) for row in grid.tolist()] == order
    assert set(order) == {(b, h // group, h % group, m * block_m) for b in range(batch) for h in range(heads)
                          for m in range(triton.cdiv(n_q, block_m))}
    if causal and sections == (1, 1):  # within a chunk, the last query blocks (most keys) first
        starts = [row[3] for row in order[: group * triton.cdiv(n_q, block_m)]]
        assert starts == sorted(starts, reverse=True)


@pytest.mark.parametrize("n_q,n_k", [(4096, 4096), (300, 1000), (1000, 300), (1, 7)])
def test_tile_blocks_count_the_key_blocks_a_tile_sees(n_q, n_k):
    rows, keys = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    visible = keys <= rows + (n_k - n_q)  # causal, bottom-right aligned
    block_m, block_n = 2 * fwd_ws.BLOCK_M, fwd_ws.BLOCK_N
    for first in range(0, n_q, block_m):
        seen = visible[first:first + block_m].any(dim=0).nonzero()
        expected = 0 if len(seen) == 0 else int(seen.max()) // block_n + 1
        assert fwd_ws.tile_blocks(first, n_q, n_k, True) == expected
        assert fwd_ws.tile_blocks(first, n_q, n_k, False) == triton.cdiv(n_k, block_n)


def test_first_free_schedule_balances_mha_causal_where_the_strided_walk_does_not():
    """MHA at 4k causal (B=4, H=32) on 132 programs: each head's query tiles run longest first, so the
    strided walk hands some programs mostly long tiles; the first-free lists end within 4% of the
    ideal, the strided walk about 12% past it (bench/forward_walk_model.py)."""
    batch, heads, n = 4, 32, 4096
    sections = dict(SECTION_PROGRAMS=1, SECTION_CHUNKS=1)
    schedule, rounds = fwd_ws.forward_schedule(batch, heads, heads, n, n, True, 132, sections, "cpu")
    order = fwd_ws.tile_order(batch * heads * n // 128, n, heads, 1, True, 1, 1)
    costs = [fwd_ws.tile_blocks(first, n, n, True) + fwd_ws.TILE_SETUP_BLOCKS for *_, first in order]
    ideal = sum(costs) / 132
    scheduled = max(sum(costs[t] for t in schedule[p, :rounds[p]].tolist()) for p in range(132))
    strided = max(sum(costs[p::132]) for p in range(132))
    assert scheduled / ideal < 1.04
    assert strided / ideal > 1.10
    assert sorted(t for p in range(132) for t in schedule[p, :rounds[p]].tolist()) == list(range(len(costs)))
    again = fwd_ws.forward_schedule(batch, heads, heads, n, n, True, 132, sections, "cpu")
    assert again[0] is schedule  # cached per launch
