"""The attention kernels against the float64 reference: output and dq/dk/dv.

On a CPU the kernels run under TRITON_INTERPRET=1 (fp32/fp16 only: the interpreter's bf16 dot is
wrong; tiny shapes: the interpreter's tiles are 16x16, so lengths around 16-40 cover one block,
several blocks and ragged tails). With CUDA the same tests run on the GPU; test_gpu.py adds bf16,
long sequences and the Gluon kernels. A variant is forced by building its plan
(``default_plan(...).replace(...)``) and running it through the launchers.
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import mgqa.kernels
import mgqa.ops
from mgqa.kernels import launch, plan_for_inputs, triton_attention
from mgqa.kernels import plan as plans
from mgqa.kernels.ops import _fwd_op
from mgqa.kernels.plan import Tiles, Walk
from tests.kernels.attention_check import (CUDA, DEVICE, check_against_reference, default_plan, forward_backward,
                                           make_inputs, run_plan)

pytestmark = pytest.mark.usefixtures("nan_poison")


def test_outputs_start_as_nan():
    """The poison the other tests rely on: uninitialised memory, and so a launcher's outputs before
    its kernel writes them, is NaN."""
    assert torch.isnan(torch.empty(64, device=DEVICE)).all()
    assert torch.isnan(torch.empty(8, dtype=torch.float16, device=DEVICE)).all()
    q, k, v = (t.detach() for t in make_inputs(1, 2, 1, 9, 9, 64, torch.float32))
    plan = default_plan(q, k, True, 0.125)
    out, lse = launch.forward(q, k, v, True, 0.125, plan)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


# (batch, heads, kv_heads, n_q, n_k, head_dim, causal, dtype)
CPU_CASES = [
    (1, 4, 1, 37, 37, 64, True, torch.float32),  # batch 1, odd length, one KV head for four query heads
    (2, 4, 2, 33, 33, 64, False, torch.float32),  # Hkv = H/2, ragged tail
    (1, 2, 2, 9, 9, 128, True, torch.float32),  # N < block, plain MHA, D 128
    (1, 4, 2, 7, 40, 64, True, torch.float32),  # prefill after a cache: Nq < Nk, bottom-right causal
    (1, 2, 1, 29, 11, 64, True, torch.float32),  # Nq > Nk: the first rows see no key and output 0
    (1, 4, 1, 21, 35, 128, False, torch.float16),  # fp16, Nq != Nk, non-causal
    (2, 4, 4, 24, 24, 64, True, torch.float16),  # fp16 causal, Hkv = H
    (1, 2, 1, 17, 17, 96, True, torch.float32),  # head_dim 96 (padded to 128 inside)
]


@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,head_dim,causal,dtype", CPU_CASES)
def test_matches_float64_reference(batch, heads, kv_heads, n_q, n_k, head_dim, causal, dtype):
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype)
    check_against_reference(q, k, v, causal)


@pytest.mark.parametrize("layout", ["strided", "last_dim_strided"])
def test_strided_views(layout):
    q, k, v = make_inputs(1, 4, 2, 19, 19, 64, torch.float32, layout=layout)
    assert not q.is_contiguous() and not v.is_contiguous()
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("splits", [2, 4])
def test_dkdv_group_split_over_programs(splits):
    # Few KV heads spread each group over several programs whose fp32 partials are then summed.
    q, k, v = make_inputs(1, 4, 1, 23, 23, 64, torch.float32)
    plan = default_plan(q, k, True, 0.125).replace(dkdv=dict(splits=splits, one_loop=False))
    check_against_reference(q, k, v, causal=True, scale=0.125, plan=plan)


@pytest.mark.parametrize("one_loop,kv_heads", [(True, 2), (True, 1), (False, 4)])
@pytest.mark.parametrize("n_q,n_k", [(37, 37), (7, 40), (29, 11)])
def test_dkdv_one_query_loop_on_and_off(one_loop, kv_heads, n_q, n_k):
    # The plan takes one causally masked query loop (flattened with the head loop) where each dK/dV
    # program owns one head (MHA); forced here for query groups, and off for MHA.
    q, k, v = make_inputs(1, 4, kv_heads, n_q, n_k, 64, torch.float32)
    plan = default_plan(q, k, True, 0.125)
    assert plan.dkdv.one_loop == (4 // kv_heads == plan.dkdv.splits)
    check_against_reference(q, k, v, causal=True, scale=0.125, plan=plan.replace(dkdv=dict(one_loop=one_loop)))


@pytest.mark.parametrize("chunks,splits", [(1, 1), (2, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("n_q,n_k", [(37, 37), (21, 45)])
def test_causal_sections(chunks, splits, n_q, n_k):
    # Six (batch, KV head) chunks (twelve with 2 splits): sections of 2 divide them, of 4 leave a
    # ragged last section; every pass walks the sectioned order.
    q, k, v = make_inputs(2, 6, 3, n_q, n_k, 64, torch.float32)
    walk = Walk(1 << 30, chunks) if chunks > 1 else Walk()
    plan = default_plan(q, k, True, 0.125).replace(forward=dict(walk=walk), dq=dict(walk=walk),
                                                   dkdv=dict(walk=walk, splits=splits, one_loop=False))
    check_against_reference(q, k, v, causal=True, scale=0.125, plan=plan)


def _gpu_tile_configs():
    """(pass, tiles) for each block shape of the GPU configs (plan.TL_*_CONFIGS). The interpreter
    ignores warps, stages and register caps, so each block shape runs once."""
    seen = {}
    for name, configs in (("forward", plans.TL_FWD_CONFIGS), ("dq", plans.TL_DQ_CONFIGS),
                          ("dkdv", plans.TL_DKDV_CONFIGS)):
        for config in configs:
            seen.setdefault((name, config[0], config[1]), Tiles(*config))
    return [(name, tiles) for (name, _, _), tiles in seen.items()]


@pytest.mark.skipif(CUDA, reason="interpreter test; test_gpu.py runs every config on the GPU")
@pytest.mark.parametrize("pass_name,tiles", _gpu_tile_configs(),
                         ids=lambda x: f"{x.block_m}x{x.block_n}" if isinstance(x, Tiles) else x)
def test_every_gpu_block_shape(pass_name, tiles):
    """Each GPU block shape on a ragged, bottom-right causal shape (Nq < Nk, neither a multiple of
    any block), where the interpreter's 16x16 default would hide a mask slip."""
    q, k, v = make_inputs(1, 4, 2, 139, 203, 64, torch.float32)
    plan = default_plan(q, k, True, 0.125).replace(**{pass_name: dict(tiles=tiles)})
    check_against_reference(q, k, v, causal=True, scale=0.125, plan=plan)


def test_custom_scale_and_ops_dispatch():
    q, k, v = make_inputs(1, 4, 2, 18, 18, 64, torch.float32)
    check_against_reference(q, k, v, causal=False, scale=0.3,
                            fn=lambda *a, **kw: mgqa.ops.attention(*a, backend="triton", **kw))


def test_entry_point_carries_out_the_plan_of_its_inputs():
    """triton_attention runs the plan plan_attention makes for its inputs: the launchers given that
    plan produce the same bits."""
    q, k, v = make_inputs(1, 4, 2, 18, 30, 64, torch.float32)
    grad_out = torch.randn(q.shape, device=DEVICE)
    options = mgqa.kernels.default_options()
    plan = plan_for_inputs(q, k, v, causal=True, options=options)
    assert plan == default_plan(q, k, True, 0.125, options)
    ours = forward_backward(triton_attention, q, k, v, grad_out, causal=True)
    for a, b in zip(ours, run_plan(plan, q, k, v, grad_out, causal=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("aot", [False, True])
def test_compiled_custom_op_matches_eager_bit_for_bit(aot):
    """Eager calls take the autograd.Function, traced calls the mgqa:: custom ops; both launch the
    same kernels, so output and gradients agree exactly (and the trace has no graph break). With
    ``aot``, AOTAutograd also traces the backward through the ops' registered autograd formula, as
    the default torch.compile backend does."""
    q, k, v = make_inputs(2, 4, 2, 19, 23, 32, torch.float16 if CUDA else torch.float32, layout="strided")
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    eager = forward_backward(triton_attention, q, k, v, grad_out, causal=True)
    ops_seen = []

    def record(graph, example_inputs):  # record the ops in the traced graph, then run it as is
        ops_seen.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward) if aot else graph.forward

    def backend(graph, example_inputs):
        if not aot:
            return record(graph, example_inputs)
        return aot_autograd(fw_compiler=record, bw_compiler=record)(graph, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: triton_attention(q, k, v, causal=True), backend=backend, fullgraph=True)
    traced = forward_backward(lambda q, k, v, causal: compiled(q, k, v), q, k, v, grad_out, causal=True)
    assert any("gqa_attention_fwd" in op for op in ops_seen), ops_seen
    assert not aot or any("gqa_attention_bwd" in op for op in ops_seen), ops_seen
    for a, b in zip(traced, eager):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    """Gradients of gradients are not implemented: asking for them raises instead of returning
    silently wrong values."""
    q, k, v = make_inputs(1, 2, 1, 9, 9, 32, torch.float16 if CUDA else torch.float32)
    options = mgqa.kernels.default_options()
    custom_op = lambda q, k, v, causal: _fwd_op(q, k, v, causal, 0.2, options.autotune, options.gluon,  # noqa: E731
                                                 options.tma)[0]
    for call in (triton_attention, custom_op):  # eager (autograd.Function), then the op traced calls use
        out = call(q, k, v, causal=True)
        with pytest.raises(RuntimeError, match=r"gradients of gradients \(create_graph=True\) are not supported"):
            torch.autograd.grad(out.sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad(triton_attention(q, k, v, causal=True).sum(), q)  # first order still works
    assert torch.isfinite(dq).all() and not dq.requires_grad


def test_rows_without_keys_are_zero_with_zero_grad():
    q, k, v = make_inputs(1, 2, 1, 20, 6, 64, torch.float32)
    out = triton_attention(q, k, v, causal=True)
    out.sum().backward()
    assert torch.all(out[:, :, :14] == 0) and torch.all(q.grad[:, :, :14] == 0)
    assert torch.all(out[:, :, 14:].abs().sum(-1) > 0)
    _, lse = launch.forward(q.detach(), k.detach(), v.detach(), True, 0.125, default_plan(q, k, True, 0.125))
    assert torch.all(lse[:, :, :14] == float("inf")) and torch.isfinite(lse[:, :, 14:]).all()


@pytest.mark.parametrize(
    "shapes,dtype,match",
    [
        (((1, 4, 8, 80), (1, 2, 8, 80)), torch.float32, "head_dim 80"),
        (((1, 4, 8, 64), (1, 3, 8, 64)), torch.float32, r"query heads \(4\).*KV heads \(3\)"),
        (((1, 4, 8, 64), (1, 2, 8, 64)), torch.float64, "float64"),
        (((4, 8, 64), (1, 2, 8, 64)), torch.float32, "3 dims"),
        (((2, 4, 8, 64), (1, 2, 8, 64)), torch.float32, "batch differs"),
    ],
)
def test_bad_inputs_raise_value_error(shapes, dtype, match):
    q = torch.randn(shapes[0], dtype=dtype, device=DEVICE)
    k = torch.randn(shapes[1], dtype=dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        triton_attention(q, k, k.clone(), causal=True)


def test_mixed_dtypes_raise_value_error():
    q, k, v = make_inputs(1, 2, 1, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="mixed dtypes"):
        triton_attention(q, k.half(), v, causal=False)
