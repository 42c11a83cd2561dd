"""What the host plans for the Gluon dK/dV kernel (attention_bwd_ws): the persistent variant's tile
lists (every key tile exactly once, in the one-tile-per-program launch order, spread so that the
programs finish together) and the group splits of short launches."""

import pytest
import torch
import triton
import triton.language as tl

from mgqa.kernels.attention_common import _key_block_program

ws = pytest.importorskip("mgqa.kernels.attention_bwd_ws", reason="Gluon unavailable in this Triton")


@triton.jit
def _record_key_block_program(Out, n_k, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_N: tl.constexpr):
    pid_n, split, pid_bkv = _key_block_program(n_k, 1, BLOCK_N, SECTION_PROGRAMS, SECTION_CHUNKS)
    tl.store(Out + 2 * tl.program_id(0), pid_bkv)
    tl.store(Out + 2 * tl.program_id(0) + 1, pid_n)


@pytest.mark.parametrize("num_n,n_chunks,section_programs,section_chunks", [
    (5, 7, 1, 1),  # non-causal: chunk by chunk
    (5, 7, 1 << 30, 3),  # sections of three chunks, the last one short
    (4, 9, 8, 16),  # sections sized by programs (two chunks)
])
def test_launch_order_is_the_kernels(num_n, n_chunks, section_programs, section_chunks):
    out = torch.full((num_n * n_chunks, 2), -1, dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    _record_key_block_program[(num_n * n_chunks,)](out, num_n * 2 * ws.BLOCK_N, section_programs, section_chunks,
                                                   BLOCK_N=2 * ws.BLOCK_N)
    order = ws.launch_order(num_n, n_chunks, section_programs, section_chunks)
    assert [tuple(row) for row in out.tolist()] == order
    assert sorted(order) == [(c, n) for c in range(n_chunks) for n in range(num_n)]


@pytest.mark.parametrize("n_q,n_k", [(1000, 1000), (300, 1000), (1000, 300), (1, 7)])
def test_tile_steps_count_the_query_blocks_that_see_the_tile(n_q, n_k):
    rows, keys = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    visible = keys <= rows + (n_k - n_q)  # causal, bottom-right aligned
    for pid_n in range(triton.cdiv(n_k, 2 * ws.BLOCK_N)):
        tile = visible[:, pid_n * 2 * ws.BLOCK_N:(pid_n + 1) * 2 * ws.BLOCK_N].any(dim=1)
        first_block = int(tile.nonzero()[0]) // ws.BLOCK_M if tile.any() else triton.cdiv(n_q, ws.BLOCK_M)
        assert ws.tile_steps(pid_n, n_q, n_k, causal=True) == triton.cdiv(n_q, ws.BLOCK_M) - first_block
        assert ws.tile_steps(pid_n, n_q, n_k, causal=False) == triton.cdiv(n_q, ws.BLOCK_M)


def test_first_free_schedule_keeps_the_order_and_balances():
    costs = [float(64 - 2 * (i // 8)) for i in range(256)]  # causal-like: long tiles first
    lists = ws.first_free_schedule(costs, 13)
    assert sorted(p for tiles in lists for p in tiles) == list(range(256))
    assert all(tiles == sorted(tiles) for tiles in lists)
    assert [tiles[0] for tiles in lists] == list(range(13))  # the first round starts as a launch would
    loads = [sum(costs[p] for p in tiles) for tiles in lists]
    assert max(loads) - min(loads) <= max(costs)


@pytest.mark.parametrize("causal", [True, False])
def test_persistent_schedule_lists_every_tile_once(causal):
    batch, kv_heads, n_q, n_k, group, programs = 2, 3, 1000, 1000, 4, 11
    sections = {"SECTION_PROGRAMS": 1 << 30, "SECTION_CHUNKS": 2} if causal else {"SECTION_PROGRAMS": 1,
                                                                                  "SECTION_CHUNKS": 1}
    schedule, rounds = ws.persistent_schedule(batch, kv_heads, n_q, n_k, group, causal, programs, sections, "cpu")
    num_n = triton.cdiv(n_k, 2 * ws.BLOCK_N)
    assert schedule.dtype == rounds.dtype == torch.int32 and schedule.shape == (programs, int(rounds.max()))
    tiles = [int(t) for p in range(programs) for t in schedule[p, :int(rounds[p])]]
    assert sorted(tiles) == list(range(batch * kv_heads * num_n))
    steps = [group * ws.tile_steps(t % num_n, n_q, n_k, causal) + ws.TILE_SETUP_STEPS for t in range(len(tiles))]
    loads = [sum(steps[int(t)] for t in schedule[p, :int(rounds[p])]) for p in range(programs)]
    assert max(loads) - min(loads) <= max(steps)
    # Cached: the same launch reuses the same tensors.
    again = ws.persistent_schedule(batch, kv_heads, n_q, n_k, group, causal, programs, sections, "cpu")
    assert again[0] is schedule and again[1] is rounds


def test_persistent_schedule_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ws, "_schedules", {})
    monkeypatch.setattr(ws, "MAX_SCHEDULES", 3)
    sections = {"SECTION_PROGRAMS": 1, "SECTION_CHUNKS": 1}
    for n in range(100, 600, 100):
        ws.persistent_schedule(1, 2, n, n, 2, True, 3, sections, "cpu")
    assert [key[2] for key in ws._schedules] == [300, 400, 500]  # the newest three shapes


@pytest.mark.parametrize("batch,kv_heads,n_k,group,max_splits,expected", [
    (4, 8, 4096, 4, 8, 1),  # 1024 key tiles: enough without a split
    (4, 1, 4096, 32, 8, 4),  # MQA: 128 tiles, 512 with four splits
    (4, 1, 4096, 32, 2, 0),  # not allowed enough splits: the tl kernel runs
    (1, 1, 1024, 6, 8, 0),  # 8 tiles; splits must divide the group of 6 (2 does, 4 does not)
    (4, 2, 8192, 1, 8, 1),  # MHA cannot split; 512 tiles need no split
    (1, 2, 4096, 1, 8, 0),  # MHA with 64 tiles: the tl kernel runs
])
def test_group_splits_are_the_fewest_that_fill_the_gpu(batch, kv_heads, n_k, group, max_splits, expected):
    assert ws.group_splits(batch, kv_heads, n_k, group, 264, max_splits) == expected


def _inputs(batch=1, heads=4, kv_heads=2, n=100):
    q = torch.zeros(batch, heads, n, 128, dtype=torch.bfloat16)
    k = torch.zeros(batch, kv_heads, n, 128, dtype=torch.bfloat16)
    stats = torch.zeros(batch, heads, n)
    return q, k, stats


@pytest.mark.parametrize("rows,dtype,expected", [
    (100, torch.float32, "rows >= 100 and a multiple of 64"),  # not padded to the query step
    (64, torch.float32, "rows >= 100"),  # too short
    (128, torch.bfloat16, "torch.bfloat16"),  # the reductions are float32
])
def test_fused_dq_buffer_is_checked_before_launch(rows, dtype, expected):
    """The dQ buffer of the fused path must be float32 with its rows padded to the query step (the
    kernel adds the last step's overhang into the padding): anything else is refused, naming it."""
    q, k, stats = _inputs()
    dq_acc = torch.zeros(1, 4, rows, 128, dtype=dtype)
    with pytest.raises(ValueError, match="dq_acc") as err:
        ws.launch(q, k, k, q, stats, stats, k, k, True, 1.0, 1.0, {"SECTION_PROGRAMS": 1, "SECTION_CHUNKS": 1},
                  dq_acc=dq_acc)
    assert expected in str(err.value) and str(tuple(dq_acc.shape)) in str(err.value)


def test_persistent_kernel_refuses_the_fused_dq():
    q, k, stats = _inputs()
    dq_acc = torch.zeros(1, 4, 128, 128)
    with pytest.raises(ValueError, match="persistent dK/dV kernel neither splits the query group nor computes dQ"):
        ws.launch(q, k, k, q, stats, stats, k, k, True, 1.0, 1.0, {"SECTION_PROGRAMS": 1, "SECTION_CHUNKS": 1},
                  persistent=True, dq_acc=dq_acc)
