"""The attention kernels on a CUDA GPU (skipped elsewhere): the default plans at the shapes users
hit, in fp16 and bf16, long sequences, fp32, determinism and torch.compile; every tl tile config;
then each Gluon kernel (sm_90) forced by a plan on small shapes, so that its masks and ragged
tails are exercised, against the float64 reference and the tl kernels."""

from __future__ import annotations

import pytest
import torch
import triton

import mgqa.ops
from mgqa.kernels import launch, triton_attention
from mgqa.kernels import plan as plans
from mgqa.kernels.plan import AttentionPlan, KernelOptions, Tiles, Walk
from tests.kernels.attention_check import (ATOL, CUDA, DEVICE, check_against_reference, default_plan, forward_backward,
                                           make_inputs, rel_err, run_plan)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA"), pytest.mark.usefixtures("nan_poison")]

GPU_CASES = [
    (2, 8, 2, 1000, 1000, 128, True),
    (1, 8, 1, 333, 1111, 64, True),
    (1, 4, 4, 257, 129, 32, False),
    (1, 4, 2, 517, 517, 96, True),
    (1, 4, 1, 300, 300, 256, True),
    (2, 4, 2, 1, 513, 128, True),
    (2, 4, 4, 700, 700, 128, True),  # causal MHA: the dK/dV kernel's one flattened query loop
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,head_dim,causal", GPU_CASES)
def test_default_plan_matches_reference(batch, heads, kv_heads, n_q, n_k, head_dim, causal, dtype):
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype, layout="strided")
    check_against_reference(q, k, v, causal)


def test_float32():
    q, k, v = make_inputs(1, 4, 2, 300, 300, 128, torch.float32)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,causal", [(4096, True), (16384, True), (16384, False)])
def test_long_sequences(n, causal, dtype):
    # The float64 oracle at 16k would take (H, N, N) doubles; a float32 upcast is already far more
    # precise than the half-precision kernels.
    q, k, v = make_inputs(1, 4, 1, n, n, 128, dtype)
    check_against_reference(q, k, v, causal, oracle=torch.float32)


def test_deterministic():
    q, k, v = make_inputs(2, 8, 2, 777, 777, 128, torch.bfloat16)
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    first = forward_backward(triton_attention, q, k, v, grad_out, causal=True)
    second = forward_backward(triton_attention, q, k, v, grad_out, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 8, 2, 256, 256, 64, torch.bfloat16, layout="strided")

    def block(q, k, v):
        return (mgqa.ops.attention(q, k, v, causal=True, backend="triton") * 2).sum()

    compiled = torch.compile(block, fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(block(q, k, v), (q, k, v))
    for a, b in zip(grads, eager):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)


def _tl_configs():
    return [(name, Tiles(*config)) for name, configs in (("forward", plans.TL_FWD_CONFIGS), ("dq", plans.TL_DQ_CONFIGS),
                                                         ("dkdv", plans.TL_DKDV_CONFIGS))
            for config in configs]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("pass_name,tiles", _tl_configs(), ids=str)
def test_every_tl_tile_config(pass_name, tiles, head_dim):
    """Each tl config the autotuner may pick (where it fits this head_dim), with its warps, stages and
    register cap, on a ragged bottom-right causal shape."""
    if not plans.tile_fits(tiles.block_m, tiles.block_n, tiles.num_stages, tiles.maxnreg, head_dim, 2):
        pytest.skip(f"{tiles} does not fit head_dim {head_dim}")
    q, k, v = make_inputs(1, 8, 2, 333, 517, head_dim, torch.float16)
    tl_only = KernelOptions(autotune=False, gluon=False)
    plan = default_plan(q, k, True, head_dim ** -0.5, tl_only).replace(**{pass_name: dict(tiles=tiles)})
    check_against_reference(q, k, v, causal=True, scale=head_dim ** -0.5, plan=plan)


# ----------------------------------------------------------------------------- the Gluon kernels

# (batch, heads, kv_heads, n_q, n_k, causal): one-row and odd lengths, Nq < Nk (prefill with a
# cache), Nq > Nk under a causal mask (rows that see no key), MQA to MHA, a ragged last key block.
WS_CASES = [
    (1, 8, 2, 1, 7, True),
    (1, 8, 2, 37, 37, True),
    (2, 8, 1, 100, 300, True),
    (1, 8, 8, 300, 100, True),
    (1, 4, 2, 129, 129, False),
    (1, 4, 4, 1000, 1000, False),
    (2, 8, 2, 2048, 2048, True),
    (1, 4, 1, 191, 4097, False),
    (4, 8, 8, 1024, 1024, True),  # 256 key tiles: a persistent program takes several
]
SCALE = 128 ** -0.5


def gluon_or_skip(q: torch.Tensor) -> None:
    device = launch.device_props(q.device)
    if device.capability != (9, 0):
        pytest.skip(f"the Gluon kernels are written for sm_90, not sm_{device.capability[0]}{device.capability[1]}")
    reason = launch.gluon_reason()
    if reason is not None:
        pytest.skip(reason)


def gluon_plan(q, k, causal, **passes) -> AttentionPlan:
    """The default plan of the real device, with ``passes`` replaced (the Gluon kernels forced)."""
    return default_plan(q, k, causal, SCALE).replace(**passes)


def tl_plan(q, k, causal) -> AttentionPlan:
    return default_plan(q, k, causal, SCALE, KernelOptions(autotune=False, gluon=False))


GLUON_FWD_TILES = Tiles(plans.GLUON_FWD_BLOCK_M, plans.GLUON_FWD_BLOCK_N, 4, plans.GLUON_FWD_STAGES)
GLUON_DQ_TILES = Tiles(plans.GLUON_DQ_BLOCK_M, plans.GLUON_DQ_BLOCK_N, 4, plans.GLUON_DQ_STAGES)


def gluon_dkdv(causal: bool, splits: int = 1, programs: int = 0, walk: Walk = Walk()) -> dict:
    """The dK/dV pass of the Gluon kernel: per key tile, or persistent with ``programs``."""
    if programs:
        stages, prefetch, kv_sets = plans.GLUON_DKDV_PERSISTENT_STAGES[causal]
        tiles = Tiles(plans.GLUON_DKDV_BLOCK_M, plans.GLUON_DKDV_BLOCK_N, 4, stages, prefetch=prefetch,
                      kv_sets=kv_sets)
        return dict(kernel="gluon_persistent", tiles=tiles, tma=True, splits=1, programs=programs, walk=walk,
                    one_loop=False, reason="")
    stages, prefetch = plans.GLUON_DKDV_STAGES[causal]
    tiles = Tiles(plans.GLUON_DKDV_BLOCK_M, plans.GLUON_DKDV_BLOCK_N, 4, stages, prefetch=prefetch)
    return dict(kernel="gluon", tiles=tiles, tma=True, splits=splits, programs=0, walk=walk, one_loop=False,
                reason="")


@pytest.mark.parametrize("first_free", [False, True], ids=["strided", "first_free"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", WS_CASES)
def test_gluon_forward_persistent(batch, heads, kv_heads, n_q, n_k, causal, dtype, first_free):
    """Three programs walk every query tile (some more than others), strided or from first-free
    lists: out and lse match the tl kernel's (lse +inf on the same rows), and forward+backward
    matches the float64 reference."""
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    gluon_or_skip(q)
    plan = gluon_plan(q, k, causal, forward=dict(kernel="gluon_persistent", tiles=GLUON_FWD_TILES, tma=True,
                                                 first_free=first_free, programs=3, walk=Walk(), reason=""))
    qc, kc, vc = (t.detach().contiguous() for t in (q, k, v))
    out_ws, lse_ws = launch.forward(qc, kc, vc, causal, SCALE, plan)
    out_tl, lse_tl = launch.forward(qc, kc, vc, causal, SCALE, tl_plan(q, k, causal))
    assert torch.equal(torch.isinf(lse_ws), torch.isinf(lse_tl))
    seen = torch.isfinite(lse_tl)
    assert torch.allclose(lse_ws[seen], lse_tl[seen], atol=1e-3, rtol=1e-4)
    assert torch.allclose(out_ws.float(), out_tl.float(), atol=ATOL[dtype], rtol=1e-2)
    assert torch.all(out_ws[~seen] == 0)
    check_against_reference(q, k, v, causal, scale=SCALE, plan=plan, label=f"gluon_fwd:{dtype}")


def check_gluon_backward(plan: AttentionPlan, q, k, v, causal, label):
    """The Gluon backward of ``plan`` agrees with the tl one and matches the float64 reference."""
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    ws = run_plan(plan, q, k, v, grad_out, causal=causal, scale=SCALE)
    tl = run_plan(tl_plan(q, k, causal), q, k, v, grad_out, causal=causal, scale=SCALE)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ws, tl):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b.double()) < 2e-2, name
    check_against_reference(q, k, v, causal, scale=SCALE, plan=plan, label=label)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", WS_CASES)
def test_gluon_dq(batch, heads, kv_heads, n_q, n_k, causal, dtype):
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    gluon_or_skip(q)
    plan = gluon_plan(q, k, causal, dq=dict(kernel="gluon", tiles=GLUON_DQ_TILES, tma=True, reason=""))
    check_gluon_backward(plan, q, k, v, causal, f"gluon_dq:{dtype}")


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", WS_CASES)
def test_gluon_dkdv_per_key_tile(batch, heads, kv_heads, n_q, n_k, causal, dtype, splits):
    if (heads // kv_heads) % splits:
        pytest.skip(f"{splits} splits do not divide the group of {heads // kv_heads}")
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    gluon_or_skip(q)
    plan = gluon_plan(q, k, causal, dkdv=gluon_dkdv(causal, splits=splits))
    check_gluon_backward(plan, q, k, v, causal, f"gluon_dkdv:{dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", [
    (1, 8, 2, 37, 37, True),
    (2, 8, 1, 100, 300, True),
    (1, 4, 1, 191, 4097, False),
])
def test_gluon_dkdv_split_over_the_whole_group(batch, heads, kv_heads, n_q, n_k, causal, dtype):
    """As many splits as the group has heads: each program sums one head, into float32 partials."""
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    gluon_or_skip(q)
    plan = gluon_plan(q, k, causal, dkdv=gluon_dkdv(causal, splits=heads // kv_heads))
    check_gluon_backward(plan, q, k, v, causal, f"gluon_dkdv_split:{dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", WS_CASES)
def test_gluon_dkdv_persistent(batch, heads, kv_heads, n_q, n_k, causal, dtype):
    """Three programs, each walking several key tiles (some more than others) through both K/V
    buffer sets where the plan gives two."""
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    gluon_or_skip(q)
    tiles = batch * kv_heads * triton.cdiv(n_k, 2 * plans.GLUON_DKDV_BLOCK_N)
    walk = Walk(1 << 30, 2) if causal else Walk()
    plan = gluon_plan(q, k, causal, dkdv=gluon_dkdv(causal, programs=min(3, tiles), walk=walk))
    check_gluon_backward(plan, q, k, v, causal, f"gluon_dkdv_persistent:{dtype}")


@pytest.mark.parametrize("chunks", [2, 3])
def test_gluon_sectioned_order_gives_identical_results(chunks):
    """The Gluon kernels in the sectioned causal order (a few (batch, KV head) chunks per section;
    with 3 of the 4 chunks the last section is ragged) still compute every tile once: out, lse and
    the gradients are bit-identical to the plain order's."""
    q, k, v = (t.detach() for t in make_inputs(2, 8, 2, 700, 700, 128, torch.bfloat16))
    gluon_or_skip(q)
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)

    def run(walk: Walk):
        plan = gluon_plan(q, k, True, forward=dict(kernel="gluon_persistent", tiles=GLUON_FWD_TILES, tma=True,
                                                   first_free=True, programs=5, walk=walk, reason=""),
                          dq=dict(kernel="gluon", tiles=GLUON_DQ_TILES, tma=True, walk=walk, reason=""),
                          dkdv=gluon_dkdv(True, splits=2, walk=walk))
        out, lse = launch.forward(q, k, v, True, SCALE, plan)
        return (out, lse, *launch.backward(grad_out, q, k, v, out, lse, True, SCALE, plan))

    plain, sectioned = run(Walk()), run(Walk(1 << 30, chunks))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), sectioned, plain):
        assert torch.equal(a, b), name
