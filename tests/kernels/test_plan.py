"""The attention plan's rules (``mgqa.kernels.plan``), checked on CPU without a GPU: which kernel
each pass gets and why, the dK/dV group splits, the causal launch order's sections, the tl tiles
without autotuning, and the host-made orders and schedules, which must equal the kernels' own
launch order (read back from ``tl_common`` in Triton's interpreter)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

import mgqa.kernels
from mgqa.kernels import launch
from mgqa.kernels import plan as plans
from mgqa.kernels.plan import (AttentionPlan, DeviceProps, KernelOptions, PassPlan, Tiles, Walk, plan_attention,
                               section_sizes)
from mgqa.kernels.tl_common import _key_block_program, _query_block_at, _query_block_program

H100 = DeviceProps((9, 0), 132, 50 * 2**20)
A100 = DeviceProps((8, 0), 108, 40 * 2**20)
INTERPRETER = DeviceProps(interpreter=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = 128 ** -0.5


def plan(batch=4, heads=32, kv_heads=8, n_q=4096, n_k=4096, head_dim=128, dtype="bfloat16", causal=True,
         scale=SCALE, device=H100, **kw) -> AttentionPlan:
    return plan_attention(batch, heads, kv_heads, n_q, n_k, head_dim, dtype, causal, scale, device, **kw)


# ----------------------------------------------------------------------------- which kernel, and why

def test_h100_runs_the_gluon_kernels_at_4k():
    p = plan()
    assert p.forward == PassPlan("gluon_persistent", Tiles(plans.GLUON_FWD_BLOCK_M, plans.GLUON_FWD_BLOCK_N, 4,
                                                           plans.GLUON_FWD_STAGES),
                                 tma=True, first_free=True, programs=132)
    assert p.dq == PassPlan("gluon", Tiles(plans.GLUON_DQ_BLOCK_M, plans.GLUON_DQ_BLOCK_N, 4, plans.GLUON_DQ_STAGES),
                            tma=True)
    # 4 x 8 x 32 key tiles = 1024 programs: more than 4 per SM, no split; causal: sections of 4
    # (batch, KV head) chunks, 8 MiB of Q and dO each within 65% of the 50 MiB L2.
    assert p.dkdv == PassPlan("gluon", Tiles(64, 64, 4, 3, prefetch=False), walk=Walk(4 * 132, 4), tma=True,
                              splits=1)
    assert all(not x.reason for x in (p.forward, p.dq, p.dkdv))


def test_without_a_causal_mask_the_forward_walks_strided_and_dkdv_prefetches():
    p = plan(causal=False)
    assert p.forward.kernel == "gluon_persistent" and not p.forward.first_free  # equal tiles
    assert p.dkdv.tiles == Tiles(64, 64, 4, 4, prefetch=True) and p.dkdv.walk == Walk()


@pytest.mark.parametrize("n_k,kernel", [(512, "tl"), (1023, "tl"), (1024, "gluon_persistent")])
@pytest.mark.parametrize("causal", [True, False])
def test_gluon_forward_only_from_1024_keys(n_k, kernel, causal):
    p = plan(n_q=n_k, n_k=n_k, causal=causal)
    assert p.forward.kernel == kernel
    if kernel == "tl":
        assert p.forward.reason == f"{n_k} keys < 1024"
    assert p.dq.kernel == "gluon"  # dQ has no length rule


@pytest.mark.parametrize("change,reason", [
    (dict(head_dim=64), "head_dim 64"),
    (dict(head_dim=256), "head_dim 256"),
    (dict(dtype="float32"), "float32"),
    (dict(device=A100), "sm_80"),
    (dict(device=DeviceProps((10, 0), 148, 126 * 2**20)), "sm_100"),
    (dict(device=INTERPRETER), "interpreter"),
    (dict(options=KernelOptions(gluon=False)), "gluon off"),
    (dict(options=KernelOptions(tma=False)), "no tensor descriptors"),
    (dict(layout_ok=False), "layout unfit for tensor descriptors"),
    (dict(gluon_reason="triton 3.4.0 older than 3.6"), "triton 3.4.0 older than 3.6"),
])
def test_every_pass_falls_back_to_tl_naming_why(change, reason):
    p = plan(**change)
    for name in ("forward", "dq", "dkdv"):
        x = getattr(p, name)
        assert x.kernel == "tl" and x.reason == reason, (name, x)
        assert reason in x.describe()


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_gluon_forward_needs_a_positive_scale(scale):
    p = plan(scale=scale)
    assert p.forward.kernel == "tl" and f"scale {scale}" in p.forward.reason
    assert p.dq.kernel == "gluon" and p.dkdv.kernel == "gluon"


def test_fp16_runs_gluon_too():
    p = plan(dtype="float16")
    assert (p.forward.kernel, p.dq.kernel, p.dkdv.kernel) == ("gluon_persistent", "gluon", "gluon")


def test_tl_kernels_use_tensor_descriptors_on_hopper_only():
    assert plan(head_dim=64).forward.tma  # power-of-two head_dim on sm_90
    assert not plan(head_dim=96).forward.tma
    assert not plan(device=A100).forward.tma
    assert not plan(device=INTERPRETER).forward.tma
    assert not plan(head_dim=64, layout_ok=False).forward.tma


# ----------------------------------------------------------------------------- dK/dV splits

@pytest.mark.parametrize("heads,kv_heads,causal,splits", [
    (32, 8, True, 1),  # 4 x 8 x 32 = 1024 key-tile programs: no split
    (32, 8, False, 1),
    (32, 1, False, 4),  # MQA: 128 programs; 4 splits give 512 >= 2 per SM (264)
    (32, 1, True, 8),  # causal: twice that (528) where the group allows: 8 splits give 1024
    (4, 1, True, 4),  # a group of 4 cannot reach 528 (4 splits give 512): the unmasked rule's 4
])
def test_gluon_dkdv_splits_are_the_fewest_that_fill_the_gpu(heads, kv_heads, causal, splits):
    p = plan(heads=heads, kv_heads=kv_heads, causal=causal)
    assert p.dkdv.kernel == "gluon" and p.dkdv.splits == splits, p.dkdv


@pytest.mark.parametrize("batch,kv_heads,n_k,group,max_splits,expected", [
    (4, 8, 4096, 4, 8, 1),  # 1024 key tiles: enough without a split
    (4, 1, 4096, 32, 8, 4),  # MQA: 128 tiles, 512 with four splits
    (4, 1, 4096, 32, 2, 0),  # not allowed enough splits
    (1, 1, 1024, 6, 8, 0),  # 8 tiles; splits must divide the group of 6 (2 does, 4 does not)
    (4, 2, 8192, 1, 8, 1),  # MHA cannot split; 512 tiles need no split
    (1, 2, 4096, 1, 8, 0),  # MHA with 64 tiles
])
def test_group_splits_rule(batch, kv_heads, n_k, group, max_splits, expected):
    assert plans.gluon_dkdv_group_splits(batch, kv_heads, n_k, group, 264, max_splits) == expected


def test_too_few_key_tiles_fall_back_to_tl_with_the_count():
    p = plan(batch=1, heads=32, kv_heads=1, n_q=1024, n_k=1024)  # 8 key tiles, 64 at 8 splits
    assert p.dkdv.kernel == "tl"
    assert p.dkdv.reason == "8 key-tile programs, < 2/SM with up to 8 splits"
    assert "8 key-tile programs" in p.describe()
    assert p.forward.kernel == "gluon_persistent" and p.dq.kernel == "gluon"


@pytest.mark.parametrize("causal", [True, False])
def test_mha_takes_the_persistent_dkdv(causal):
    p = plan(heads=32, kv_heads=32, causal=causal)  # 4 x 32 x 32 = 4096 key tiles
    stages, prefetch, kv_sets = plans.GLUON_DKDV_PERSISTENT_STAGES[causal]
    assert p.dkdv.kernel == "gluon_persistent" and p.dkdv.splits == 1 and p.dkdv.programs == 132
    assert p.dkdv.tiles == Tiles(64, 64, 4, stages, prefetch=prefetch, kv_sets=kv_sets)
    assert (p.dkdv.walk != Walk()) == causal


def test_mha_with_few_key_tiles_runs_tl():
    p = plan(batch=1, heads=2, kv_heads=2)  # 64 key tiles, and MHA cannot split
    assert p.dkdv.kernel == "tl" and "64 key-tile programs" in p.dkdv.reason


@pytest.mark.parametrize("batch,kv_heads,n_k,group,sms,expected", [
    (1, 1, 4096, 8, 108, 8),  # 32 programs of 128 keys: 8 splits (the most) give 256 >= 216
    (1, 1, 4096, 4, 108, 4),  # the group of 4 allows 4
    (1, 2, 4096, 8, 108, 4),  # 64 programs: 4 splits give 256
    (4, 8, 4096, 4, 108, 1),  # 1024 programs: enough
    (1, 1, 4096, 1, 108, 1),  # MHA: one head per program already
    (1, 1, 4096, 6, 108, 2),  # splits divide the group
])
def test_tl_dkdv_splits(batch, kv_heads, n_k, group, sms, expected):
    device = DeviceProps((8, 0), sms, 40 * 2**20)
    assert plans.tl_dkdv_splits(batch, kv_heads, n_k, group, device) == expected
    assert plans.tl_dkdv_splits(batch, kv_heads, n_k, group, INTERPRETER) == 1


@pytest.mark.parametrize("heads,kv_heads,one_loop", [(4, 4, True), (8, 1, True), (32, 8, False)])
def test_tl_dkdv_one_loop_where_each_program_owns_one_head(heads, kv_heads, one_loop):
    # A100, 1 x kv_heads x 4096: MQA's group of 8 splits 8 ways, so each program owns one head.
    p = plan(batch=1, heads=heads, kv_heads=kv_heads, device=A100)
    assert p.dkdv.kernel == "tl" and p.dkdv.one_loop == one_loop
    assert p.dkdv.one_loop == (heads // kv_heads == p.dkdv.splits)


def test_interpreter_plan_uses_small_tiles_and_ragged_sections():
    p = plan(batch=1, heads=4, kv_heads=2, n_q=37, n_k=37, head_dim=64, dtype="float32", device=INTERPRETER)
    small = Tiles(*plans.TL_INTERPRETER_CONFIG)
    assert p.forward.tiles == p.dq.tiles == p.dkdv.tiles == small  # autotune does not apply
    assert p.dkdv.walk == Walk(1 << 30, plans.INTERPRETER_SECTION_CHUNKS)
    assert p.forward.walk == p.dq.walk == Walk()  # only dK/dV takes the sectioned order
    assert p.dkdv.splits == 1 and p.dkdv.one_loop is False
    mha = plan(batch=1, heads=4, kv_heads=4, n_q=37, n_k=37, head_dim=64, dtype="float32", device=INTERPRETER)
    assert mha.dkdv.one_loop
    assert plan(causal=False, device=INTERPRETER).dkdv.walk == Walk()


# ----------------------------------------------------------------------------- sections

@pytest.mark.parametrize("chunks,per_chunk,expected", [
    (64, 32, 8),  # 9 fit in L2: 8 sections of 8, not 7 of 9 and a last of 1
    (16, 32, 8),  # 9 fit: 2 sections of 8
    (9, 32, 9),
    (64, 128, 5),  # 5 chunks give 4 waves of programs: 13 sections of 5 (the last of 4)
])
def test_sections_are_even(chunks, per_chunk, expected):
    device = DeviceProps((9, 0), 132, 60 * 2**20)
    chunk_bytes = 4 * 2**20  # int(0.65 * 60 MiB) // 4 MiB = 9 chunks fit
    walk = section_sizes(chunk_bytes, device, chunks, per_chunk)
    assert walk == Walk(4 * 132, expected)
    order = plans.key_tile_order(per_chunk, chunks, walk)
    assert sorted(order) == [(c, n) for c in range(chunks) for n in range(per_chunk)]  # each tile once
    section_chunks = [len({c for c, _ in order[i:i + expected * per_chunk]})
                      for i in range(0, len(order), expected * per_chunk)]
    assert max(section_chunks) - min(section_chunks) <= 1  # no short last section


def test_sections_without_the_launch_fill_l2():
    device = DeviceProps((9, 0), 132, 60 * 2**20)
    assert section_sizes(4 * 2**20, device) == Walk(4 * 132, 9)
    assert section_sizes(10**12, device) == Walk(4 * 132, 1)  # bigger than L2: one chunk each
    assert section_sizes(4 * 2**20, INTERPRETER) == Walk(1 << 30, plans.INTERPRETER_SECTION_CHUNKS)


def test_non_causal_walks_the_plain_order():
    for device in (H100, A100, INTERPRETER):
        p = plan(kv_heads=1, causal=False, device=device)
        assert p.forward.walk == p.dq.walk == p.dkdv.walk == Walk()


# ----------------------------------------------------------------------------- tl tiles

@pytest.mark.parametrize("head_dim,dtype", [(32, "bfloat16"), (64, "float16"), (128, "bfloat16"), (96, "float16"),
                                            (256, "bfloat16"), (128, "float32"), (64, "float32")])
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_without_autotune_the_first_fitting_config_runs(kind, head_dim, dtype):
    configs = {"fwd": plans.TL_FWD_CONFIGS, "dq": plans.TL_DQ_CONFIGS, "dkdv": plans.TL_DKDV_CONFIGS}[kind]
    elem = 4 if dtype == "float32" else 2
    block_d = triton.next_power_of_2(head_dim)
    fitting = [c for c in configs if plans.tile_fits(c[0], c[1], c[3], c[4], block_d, elem)]
    p = plan(head_dim=head_dim, dtype=dtype, device=A100, options=KernelOptions(autotune=False))
    tiles = {"fwd": p.forward, "dq": p.dq, "dkdv": p.dkdv}[kind].tiles
    assert tiles == Tiles(*(fitting[0] if fitting else configs[-1]))
    assert plan(head_dim=head_dim, dtype=dtype, device=A100).forward.tiles is None  # autotuned
    assert "autotuned" in plan(head_dim=head_dim, dtype=dtype, device=A100).forward.describe()


def test_tile_fits_rules():
    # fp32 and head_dim 256: register tiles of at most 64 x 64.
    assert not plans.tile_fits(128, 64, 3, None, 128, 4)
    assert plans.tile_fits(64, 32, 2, None, 128, 4)
    assert not plans.tile_fits(128, 64, 2, None, 256, 2)
    assert plans.tile_fits(64, 32, 2, None, 256, 2)
    # A register cap only where the tile was sized for it (128 x 128 at head_dim 64).
    assert plans.tile_fits(128, 128, 2, 128, 64, 2)
    assert not plans.tile_fits(128, 128, 2, 128, 128, 2)
    assert plans.tile_fits(128, 128, 2, None, 128, 2)
    # The byte budget: Q plus pipelined K and V tiles.
    assert plans.tile_fits(64, 64, 3, None, 256, 2) is False  # (64 + 384) * 256 * 2 > 200 KiB
    assert plans.tile_fits(128, 64, 8, None, 64, 2) is True  # (128 + 1024) * 64 * 2 = 144 KiB
    assert plans.tile_fits(128, 64, 12, None, 64, 2) is False


def test_tl_configs_keep_the_fitting_ones_in_order():
    kept = plans.tl_configs("fwd", 256, 2, interpreter=False)
    assert kept == [Tiles(*c) for c in plans.TL_FWD_CONFIGS if plans.tile_fits(c[0], c[1], c[3], c[4], 256, 2)]
    assert kept == [Tiles(64, 32, 4, 2)]
    assert plans.tl_configs("dq", 64, 2, interpreter=True) == [Tiles(*plans.TL_INTERPRETER_CONFIG)]
    assert plans.tl_configs("dkdv", 128, 2, False)[0] == Tiles(*plans.TL_DKDV_CONFIGS[0])


# ----------------------------------------------------------------------------- the plan objects

def test_describe_names_kernel_tiles_splits_and_reason():
    p = plan(kv_heads=1)
    assert p.forward.describe() == "gluon_persistent 64x128 first-free"
    assert p.dkdv.describe().startswith("gluon 64x64 8 splits sections ")
    tl = plan(device=A100, options=KernelOptions(autotune=False), batch=1, kv_heads=1, heads=8)
    # Each split's Q and dO: 2 x 4096 x 128 x 2 bytes = 2 MiB; 65% of 40 MiB holds 13.
    assert tl.dkdv.describe() == "tl 64x64 8 splits sections 13 (sm_80)"
    assert plan(device=A100).dq.describe() == "tl autotuned (sm_80)"
    text = plan(n_k=512, n_q=512).describe()
    assert text.startswith("fwd tl autotuned (512 keys < 1024); dq gluon 64x64; dkdv ")


def test_replace_changes_passes_field_by_field():
    p = plan(device=INTERPRETER)
    forced = p.replace(dkdv=dict(splits=2, one_loop=False), forward=dict(tiles=Tiles(32, 32, 4, 1)))
    assert forced.dkdv == dataclasses.replace(p.dkdv, splits=2, one_loop=False)
    assert forced.forward.tiles == Tiles(32, 32, 4, 1) and forced.dq == p.dq
    assert p.dkdv.splits == 1  # the original is unchanged
    with pytest.raises(TypeError):
        p.replace(dkdv=dict(bogus=1))


def test_options_and_plans_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelOptions().autotune = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan().forward.kernel = "tl"
    assert hash(KernelOptions()) == hash(KernelOptions())  # a cache key


def test_configure_sets_the_process_default():
    before = mgqa.kernels.default_options()
    try:
        assert mgqa.kernels.configure(autotune=False) == dataclasses.replace(before, autotune=False)
        assert mgqa.kernels.default_options().autotune is False
        assert mgqa.kernels.default_options().gluon == before.gluon
        with pytest.raises(ValueError, match="bogus") as err:
            mgqa.kernels.configure(bogus=True)
        assert "autotune, gluon, tma" in str(err.value)
        assert mgqa.kernels.default_options().autotune is False  # a refused call changes nothing
    finally:
        mgqa.kernels.configure(**dataclasses.asdict(before))
    assert mgqa.kernels.default_options() == before


# ----------------------------------------------------------------------------- what launch asks of the machine

def test_device_props_under_the_interpreter():
    if torch.cuda.is_available() and not launch.INTERPRET:
        pytest.skip("a real device")
    assert launch.device_props(torch.device(DEVICE)) == DeviceProps(interpreter=True)


@pytest.mark.parametrize("version,ok", [("3.4.0", False), ("3.5.1+git1a2b", False), ("3.6.0", True),
                                        ("3.10.0", True), ("4.0.0", True), ("2.9", False)])
def test_gluon_needs_triton_3_6(version, ok):
    reason = launch.gluon_version_reason(version)
    if ok:
        assert reason is None
    else:
        assert f"triton {version}" in reason and "3.6" in reason


def test_launch_caches_are_bounded():
    cache = {}
    for i in range(launch.CACHE_LIMIT + 3):
        assert launch._cached(cache, i, lambda: i * 2) == i * 2
    assert list(cache) == list(range(3, launch.CACHE_LIMIT + 3))  # the newest, the oldest dropped
    assert launch._cached(cache, 5, lambda: None) == 10  # built once


# ----------------------------------------------------------------------------- host orders = the kernels'

@triton.jit
def _record_query_order(Out, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_M: tl.constexpr,
                        CAUSAL: tl.constexpr):
    batch, kv_head, member, start_m = _query_block_program(n_q, heads, GROUP, BLOCK_M, CAUSAL, SECTION_PROGRAMS,
                                                           SECTION_CHUNKS)
    row = Out + 4 * tl.program_id(0)
    tl.store(row, batch)
    tl.store(row + 1, kv_head)
    tl.store(row + 2, member)
    tl.store(row + 3, start_m)


@triton.jit
def _record_key_order(Out, n_k, SPLITS, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_N: tl.constexpr):
    pid_n, split, pid_bkv = _key_block_program(n_k, SPLITS, BLOCK_N, SECTION_PROGRAMS, SECTION_CHUNKS)
    tl.store(Out + 2 * tl.program_id(0), pid_bkv * SPLITS + split)
    tl.store(Out + 2 * tl.program_id(0) + 1, pid_n)


def kernel_query_order(batch, heads, group, n_q, causal, walk, rows):
    n_tiles = batch * heads * triton.cdiv(n_q, rows)
    out = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    _record_query_order[(n_tiles,)](out, n_q, heads, group, walk.programs, walk.chunks, BLOCK_M=rows, CAUSAL=causal)
    return [tuple(r) for r in out.tolist()]


def kernel_key_order(num_n, n_chunks, walk, splits=1, block_n=16):
    out = torch.full((num_n * n_chunks, 2), -1, dtype=torch.int32, device=DEVICE)
    _record_key_order[(num_n * n_chunks,)](out, num_n * block_n - 3, splits, walk.programs, walk.chunks,
                                           BLOCK_N=block_n)
    return [tuple(r) for r in out.tolist()]


@pytest.mark.parametrize("batch,heads,group,n_q,causal,walk", [
    (2, 8, 4, 300, True, Walk()),  # GQA, ragged last block, plain order
    (1, 4, 1, 256, False, Walk()),  # MHA
    (3, 6, 2, 200, True, Walk(1 << 30, 2)),  # sections of two chunks, the last one short
    (2, 4, 2, 77, True, Walk(8, 16)),  # sections sized by programs
])
def test_query_tile_order_is_the_kernels(batch, heads, group, n_q, causal, walk):
    rows = 2 * plans.GLUON_FWD_BLOCK_M
    n_tiles = batch * heads * triton.cdiv(n_q, rows)
    order = plans.query_tile_order(n_tiles, n_q, heads, group, causal, walk, rows)
    assert kernel_query_order(batch, heads, group, n_q, causal, walk, rows) == order
    assert set(order) == {(b, h // group, h % group, m * rows) for b in range(batch) for h in range(heads)
                          for m in range(triton.cdiv(n_q, rows))}
    if causal and walk == Walk():  # within a chunk, the last query blocks (most keys) first
        starts = [row[3] for row in order[: group * triton.cdiv(n_q, rows)]]
        assert starts == sorted(starts, reverse=True)


@pytest.mark.parametrize("num_n,n_chunks,walk", [
    (5, 7, Walk()),  # chunk by chunk
    (5, 7, Walk(1 << 30, 3)),  # sections of three chunks, the last one short
    (4, 9, Walk(8, 16)),  # sections sized by programs (two chunks)
])
def test_key_tile_order_is_the_kernels(num_n, n_chunks, walk):
    order = plans.key_tile_order(num_n, n_chunks, walk)
    assert kernel_key_order(num_n, n_chunks, walk) == order
    assert sorted(order) == [(c, n) for c in range(n_chunks) for n in range(num_n)]


@pytest.mark.parametrize("chunks_per_section", [None, 1, 4, 8])
@pytest.mark.parametrize("kind", ["query", "key"])
def test_sections_launch_the_longest_programs_first(kind, chunks_per_section):
    """Every (chunk, block, member) is launched once; within a section the longest causal programs
    (last query blocks, first key blocks) of every chunk come first; one chunk per section is the
    plain chunk-by-chunk order."""
    chunks, blocks = 6, 5
    walk = Walk() if chunks_per_section is None else Walk(1 << 30, chunks_per_section)
    if kind == "query":
        group, kv_heads = 2, chunks // 2  # two batches
        raw = plans.query_tile_order(chunks * blocks * group, 16 * blocks - 3, kv_heads * group, group, True, walk, 16)
        order = [(b * kv_heads + h, m // 16, member) for b, h, member, m in raw]
    else:
        group = 1
        order = [(c, n, 0) for c, n in plans.key_tile_order(blocks, chunks, walk)]
    expected = {(c, b, m) for c in range(chunks) for b in range(blocks) for m in range(group)}
    assert len(order) == len(expected) and set(order) == expected
    size = 1 if chunks_per_section is None else min(chunks_per_section, chunks)
    per_chunk = blocks * group
    longest_first = (lambda b: -b) if kind == "query" else (lambda b: b)
    for start in range(0, chunks, size):
        part = order[start * per_chunk:(start + size) * per_chunk]
        assert {c for c, _, _ in part} == set(range(start, min(start + size, chunks)))
        keys = [longest_first(b) for _, b, _ in part]
        assert keys == sorted(keys), f"section at chunk {start}: blocks {[b for _, b, _ in part]}"
    if size == 1:
        assert order == sorted(order, key=lambda r: (r[0], longest_first(r[1]), r[2]))


def test_key_order_with_splits_is_the_kernels():
    # Each group split is a chunk of its own: (batch, KV head) * SPLITS + split.
    walk = Walk(1 << 30, 3)
    assert kernel_key_order(4, 6, walk, splits=2) == plans.key_tile_order(4, 6, walk)


# ----------------------------------------------------------------------------- persistent schedules

@pytest.mark.parametrize("n_q,n_k", [(4096, 4096), (300, 1000), (1000, 300), (1, 7)])
def test_forward_tile_blocks_count_the_key_blocks_a_tile_sees(n_q, n_k):
    rows, keys = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    visible = keys <= rows + (n_k - n_q)  # causal, bottom-right aligned
    block_m, block_n = 2 * plans.GLUON_FWD_BLOCK_M, plans.GLUON_FWD_BLOCK_N
    for first in range(0, n_q, block_m):
        seen = visible[first:first + block_m].any(dim=0).nonzero()
        expected = 0 if len(seen) == 0 else int(seen.max()) // block_n + 1
        assert plans.forward_tile_blocks(first, n_q, n_k, True) == expected
        assert plans.forward_tile_blocks(first, n_q, n_k, False) == triton.cdiv(n_k, block_n)


@pytest.mark.parametrize("n_q,n_k", [(1000, 1000), (300, 1000), (1000, 300), (1, 7)])
def test_dkdv_tile_steps_count_the_query_blocks_that_see_the_tile(n_q, n_k):
    rows, keys = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    visible = keys <= rows + (n_k - n_q)
    block_m, tile = plans.GLUON_DKDV_BLOCK_M, 2 * plans.GLUON_DKDV_BLOCK_N
    for pid_n in range(triton.cdiv(n_k, tile)):
        seen = visible[:, pid_n * tile:(pid_n + 1) * tile].any(dim=1)
        first_block = int(seen.nonzero()[0]) // block_m if seen.any() else triton.cdiv(n_q, block_m)
        assert plans.dkdv_tile_steps(pid_n, n_q, n_k, causal=True) == triton.cdiv(n_q, block_m) - first_block
        assert plans.dkdv_tile_steps(pid_n, n_q, n_k, causal=False) == triton.cdiv(n_q, block_m)


def test_first_free_schedule_keeps_the_order_and_balances():
    costs = [float(64 - 2 * (i // 8)) for i in range(256)]  # causal-like: long tiles first
    lists = plans.first_free_schedule(costs, 13)
    assert sorted(p for tiles in lists for p in tiles) == list(range(256))
    assert all(tiles == sorted(tiles) for tiles in lists)
    assert [tiles[0] for tiles in lists] == list(range(13))  # the first round starts as a launch would
    loads = [sum(costs[p] for p in tiles) for tiles in lists]
    assert max(loads) - min(loads) <= max(costs)
    assert plans.first_free_schedule([1.0, 1.0], 4) == [[0], [1], [], []]  # more programs than tiles


@pytest.mark.parametrize("causal", [True, False])
def test_dkdv_schedule_lists_every_tile_once(causal):
    batch, kv_heads, n_q, n_k, group, programs = 2, 3, 1000, 1000, 4, 11
    walk = Walk(1 << 30, 2) if causal else Walk()
    lists, entries = plans.dkdv_schedule(batch, kv_heads, n_q, n_k, group, causal, programs, walk)
    num_n = triton.cdiv(n_k, 2 * plans.GLUON_DKDV_BLOCK_N)
    order = plans.key_tile_order(num_n, batch * kv_heads, walk)
    assert entries == [c * num_n + n for c, n in order]  # launch order, as tile ids
    tiles = [entries[i] for positions in lists for i in positions]
    assert sorted(tiles) == list(range(batch * kv_heads * num_n))
    steps = {t: group * plans.dkdv_tile_steps(t % num_n, n_q, n_k, causal) + plans.DKDV_TILE_SETUP_STEPS
             for t in tiles}
    loads = [sum(steps[entries[i]] for i in positions) for positions in lists]
    assert max(loads) - min(loads) <= max(steps.values())
    if causal:  # the first key tiles (most queries) start first
        assert [entries[positions[0]] % num_n for positions in lists[:2]] == [0, 0]


def test_first_free_balances_causal_mha_where_the_strided_walk_does_not():
    """MHA at 4k causal (B=4, H=32) on 132 programs: each head's query tiles run longest first, so a
    strided walk hands some programs mostly long tiles; the first-free lists end within 4% of the
    ideal, the strided walk about 12% past it (bench/forward_walk_model.py)."""
    batch, heads, n = 4, 32, 4096
    lists, entries = plans.forward_schedule(batch, heads, heads, n, n, True, 132, Walk())
    order = plans.query_tile_order(len(entries), n, heads, 1, True, Walk(), 2 * plans.GLUON_FWD_BLOCK_M)
    costs = [plans.forward_tile_blocks(first, n, n, True) + plans.FWD_TILE_SETUP_BLOCKS for *_, first in order]
    ideal = sum(costs) / 132
    scheduled = max(sum(costs[entries[i]] for i in positions) for positions in lists)
    strided = max(sum(costs[p::132]) for p in range(132))
    assert scheduled / ideal < 1.04
    assert strided / ideal > 1.10
    assert sorted(entries[i] for positions in lists for i in positions) == list(range(len(costs)))


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
    if SCHEDULED:  # as the persistent Gluon forward walks its first-free list
        row = Schedule + tl.program_id(0) * max_rounds
        for r in range(tl.load(Rounds + tl.program_id(0))):
            _record_tile(Out, Count, tl.load(row + r), n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS,
                         BLOCK_M, CAUSAL)
    else:  # strided: positions p, p + P, p + 2P, ...
        for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _record_tile(Out, Count, tile, n_tiles, n_q, heads, GROUP, SECTION_PROGRAMS, SECTION_CHUNKS, BLOCK_M,
                         CAUSAL)


@pytest.mark.parametrize("scheduled", [False, True], ids=["strided", "first_free"])
@pytest.mark.parametrize("batch,heads,group,n_q,causal,walk,programs", [
    (2, 8, 4, 300, True, Walk(), 3),  # GQA, ragged last block
    (1, 4, 1, 256, False, Walk(), 5),  # MHA, more programs than some walk
    (3, 6, 2, 200, True, Walk(1 << 30, 2), 4),  # sections of two chunks, the last one short
    (1, 2, 2, 64, True, Walk(), 7),  # fewer tiles than programs
])
def test_persistent_forward_walk_covers_the_launch_order_once(batch, heads, group, n_q, causal, walk, programs,
                                                             scheduled):
    """Program p of the persistent forward decodes positions of the launch order with
    ``_query_block_at``, strided or from the launcher's first-free table: together the programs
    compute every query tile once, as the one-program-per-tile grid does."""
    rows = 2 * plans.GLUON_FWD_BLOCK_M
    n_tiles = batch * heads * triton.cdiv(n_q, rows)
    programs = min(programs, n_tiles)
    grid = kernel_query_order(batch, heads, group, n_q, causal, walk, rows)
    schedule, rounds = launch._schedule("fwd", (batch, heads, heads // group, n_q, n_q, causal, programs, walk),
                                        torch.device(DEVICE))
    assert schedule.dtype == rounds.dtype == torch.int32 and schedule.shape == (programs, int(rounds.max()))
    walked = torch.full((n_tiles, 4), -1, dtype=torch.int32, device=DEVICE)
    count = torch.zeros(n_tiles, dtype=torch.int32, device=DEVICE)
    _record_walk[(programs,)](walked, count, schedule, rounds, schedule.shape[1], n_tiles, n_q, heads, group,
                              walk.programs, walk.chunks, BLOCK_M=rows, CAUSAL=causal, SCHEDULED=scheduled)
    assert count.tolist() == [1] * n_tiles
    assert [tuple(r) for r in walked.tolist()] == grid


def test_persistent_schedules_are_cached_per_launch():
    args = (1, 2, 300, 300, 2, True, 3, Walk(1 << 30, 2))
    first = launch._schedule("dkdv", args, torch.device(DEVICE))
    again = launch._schedule("dkdv", args, torch.device(DEVICE))
    assert again[0] is first[0] and again[1] is first[1]
    lists, entries = plans.dkdv_schedule(*args)
    for program, positions in enumerate(lists):
        assert first[1][program] == len(positions)
        assert first[0][program, :len(positions)].tolist() == [entries[i] for i in positions]
