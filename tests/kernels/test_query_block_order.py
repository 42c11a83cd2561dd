"""The query-block launch order the forward and dQ kernels share (attention_common), and the walk of
the persistent Gluon forward over it: program p takes positions p, p + P, p + 2P, ... and decodes
each with ``_query_block_at``, so together the programs compute every query block exactly once, as
the one-program-per-block launch does."""

import pytest
import torch
import triton
import triton.language as tl

from mgqa.kernels.attention_common import _query_block_at, _query_block_program

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
def _record_walk(Out, Count, n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_M: tl.constexpr,
                 CAUSAL: tl.constexpr):
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        batch, kv_head, member, start_m = _query_block_at(tile, n_tiles, n_q, heads, GROUP, BLOCK_M, CAUSAL,
                                                          SECTION_PROGRAMS, SECTION_CHUNKS)
        row = Out + 4 * tile
        tl.store(row, batch)
        tl.store(row + 1, kv_head)
        tl.store(row + 2, member)
        tl.store(row + 3, start_m)
        tl.atomic_add(Count + tile, 1)


@pytest.mark.parametrize("batch,heads,group,n_q,causal,sections,programs", [
    (2, 8, 4, 300, True, (1, 1), 3),  # GQA, ragged last block, plain order
    (1, 4, 1, 256, False, (1, 1), 5),  # MHA, more programs than some walk
    (3, 6, 2, 200, True, (1 << 30, 2), 4),  # sections of two chunks, the last one short
    (1, 2, 2, 64, True, (1, 1), 7),  # fewer tiles than programs
])
def test_persistent_walk_covers_the_launch_order_once(batch, heads, group, n_q, causal, sections, programs):
    block_m = 128
    n_tiles = batch * heads * triton.cdiv(n_q, block_m)
    grid = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    _record_grid[(n_tiles,)](grid, n_q, heads, group, *sections, BLOCK_M=block_m, CAUSAL=causal)
    walk = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    count = torch.zeros(n_tiles, dtype=torch.int32, device=DEVICE)
    _record_walk[(min(programs, n_tiles),)](walk, count, n_tiles, n_q, heads, group, *sections, BLOCK_M=block_m,
                                            CAUSAL=causal)
    assert count.tolist() == [1] * n_tiles
    assert torch.equal(walk, grid)
    # Every (batch, KV head, member, query block) exactly once.
    blocks = {tuple(row) for row in grid.tolist()}
    expected = {(b, h // group, h % group, m * block_m) for b in range(batch) for h in range(heads)
                for m in range(triton.cdiv(n_q, block_m))}
    assert blocks == expected
    if causal and sections == (1, 1):  # within a chunk, the last query blocks (most keys) first
        starts = [row[3] for row in grid.tolist()[: group * triton.cdiv(n_q, block_m)]]
        assert starts == sorted(starts, reverse=True)
