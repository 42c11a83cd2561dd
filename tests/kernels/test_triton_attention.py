"""Triton GQA attention against the float64 reference: output and dq/dk/dv.

On a CPU the kernels run under TRITON_INTERPRET=1 (fp32/fp16, tiny shapes; the interpreter's
blocks are 16x16, so lengths around 16-40 cover one block, several blocks and ragged tails).
Tests marked ``gpu`` add bf16, long sequences and torch.compile, and run only with CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import mgqa.ops
from mgqa.kernels import attention as kernels
from mgqa.kernels.attention_common import _key_block_program, _query_block_program
from mgqa.ops.reference import reference_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# Relative-error slack over PyTorch's own error in the same dtype, and a floor for near-exact cases.
K_SLACK = 4.0
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAX_ERRORS: dict[str, float] = {}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element the kernels forget to write fails the test."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", nan_empty)


def record_error(key: str, err: float) -> None:
    """Keep the largest relative error per (dtype, tensor); written out when MGQA_ATTN_ERROR_REPORT names a file."""
    MAX_ERRORS[key] = max(MAX_ERRORS.get(key, 0.0), err)
    path = os.environ.get("MGQA_ATTN_ERROR_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(MAX_ERRORS, f, indent=1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.double()
    assert torch.isfinite(x).all(), "non-finite values in result"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype, layout="contiguous"):
    """Fresh random q (B, H, Nq, D), k, v (B, Hkv, Nk, D); 'strided' gives the model's views."""
    gen = dict(dtype=dtype, device=DEVICE)
    if layout == "strided":
        # Projections produce (B, N, heads, D) and transpose; K and V are slices of one fused tensor.
        q = torch.randn(batch, n_q, heads, head_dim, **gen).transpose(1, 2)
        kv = torch.randn(batch, n_k, 2 * kv_heads, head_dim, **gen).transpose(1, 2)
        k, v = kv[:, :kv_heads], kv[:, kv_heads:]
    elif layout == "last_dim_strided":
        q = torch.randn(batch, heads, n_q, 2 * head_dim, **gen)[..., ::2]
        k = torch.randn(batch, kv_heads, n_k, head_dim, **gen)
        v = torch.randn(batch, kv_heads, head_dim, n_k, **gen).transpose(2, 3)
    else:
        q = torch.randn(batch, heads, n_q, head_dim, **gen)
        k = torch.randn(batch, kv_heads, n_k, head_dim, **gen)
        v = torch.randn(batch, kv_heads, n_k, head_dim, **gen)
    return [t.requires_grad_() for t in (q, k, v)]


def forward_backward(fn, q, k, v, grad_out, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return (out, *grads)


def check_against_reference(q, k, v, causal, scale=None, fn=None, label=None):
    fn = fn or kernels.triton_attention
    dtype = q.dtype
    grad_out = torch.randn(q.shape, dtype=dtype, device=q.device)
    ref64 = forward_backward(reference_attention, *(t.double() for t in (q, k, v)), grad_out.double(),
                             causal=causal, scale=scale, upcast=torch.float64)
    same = forward_backward(reference_attention, q, k, v, grad_out, causal=causal, scale=scale, upcast=dtype)
    mine = fn_out = forward_backward(fn, q, k, v, grad_out, causal=causal, scale=scale)
    assert fn_out[0].shape == q.shape and fn_out[0].dtype == dtype
    assert mine[2].shape == k.shape and mine[3].shape == v.shape
    for name, x, t, r in zip(("out", "dq", "dk", "dv"), mine, same, ref64):
        err, err_torch = rel_err(x, r), rel_err(t, r)
        record_error(f"{label or dtype}:{name}", err)
        assert err <= K_SLACK * err_torch + ATOL[dtype], f"{name}: rel err {err:.2e} vs torch {err_torch:.2e}"


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
def test_group_split_over_programs(monkeypatch, splits):
    # Few KV heads spread each group over several programs whose fp32 partials are then summed.
    monkeypatch.setattr(kernels, "FORCE_DKDV_SPLITS", splits)
    q, k, v = make_inputs(1, 4, 1, 23, 23, 64, torch.float32)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("mode,kv_heads", [("1", 2), ("1", 1), ("0", 4)])
@pytest.mark.parametrize("n_q,n_k", [(37, 37), (7, 40), (29, 11)])
def test_dkdv_single_query_loop_modes(monkeypatch, mode, kv_heads, n_q, n_k):
    # "auto" takes one causally masked query loop only where each dK/dV program owns one head (MHA);
    # "1" forces it for query groups, "0" keeps the masked + unmasked loops for MHA.
    monkeypatch.setattr(kernels, "DKDV_ONE_LOOP", mode)
    q, k, v = make_inputs(1, 4, kv_heads, n_q, n_k, 64, torch.float32)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("variable,value,expected", [
    ("MGQA_TRITON_DKDV_ONE_LOOP", "yes", "expected auto, 0 or 1"),
    ("MGQA_TRITON_CAUSAL_ORDER", "lpt", "expected sections or grid"),
    ("MGQA_TRITON_FWD_IMPL", "gluon", "expected auto, tiles or tl"),
    ("MGQA_TRITON_BWD_IMPL", "ws", "expected auto, tiles, persistent or tl"),
    ("MGQA_TRITON_DQ_IMPL", "on", "expected auto or tl"),
])
def test_bad_kernel_setting_names_the_value(variable, value, expected):
    env = {**os.environ, variable: value}
    proc = subprocess.run([sys.executable, "-c", "import mgqa.kernels.attention"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"{variable}={value!r}: {expected}" in proc.stderr


@pytest.mark.parametrize("order,chunks,splits", [("grid", None, 1), ("sections", 2, 1), ("sections", 4, 1),
                                                 ("sections", 4, 2), ("sections", 64, 1)])
@pytest.mark.parametrize("n_q,n_k", [(37, 37), (21, 45)])
def test_causal_launch_orders(monkeypatch, order, chunks, splits, n_q, n_k):
    # Six (batch, KV head) chunks: sections of 2 divide them, of 4 leave a ragged last section, 64 is one section.
    monkeypatch.setattr(kernels, "CAUSAL_ORDER", order)
    monkeypatch.setattr(kernels, "SECTION_KERNELS", ("fwd", "dq", "dkdv"))  # the default takes dK/dV only
    monkeypatch.setattr(kernels, "FORCE_SECTION_CHUNKS", chunks)
    monkeypatch.setattr(kernels, "FORCE_DKDV_SPLITS", splits)
    q, k, v = make_inputs(2, 6, 3, n_q, n_k, 64, torch.float32)
    check_against_reference(q, k, v, causal=True)


@triton.jit
def _record_query_order(Out, n_q, heads, GROUP, BLOCK_M: tl.constexpr, SP, SC):
    batch, kv_head, member, start_m = _query_block_program(n_q, heads, GROUP, BLOCK_M, True, SP, SC)
    pid = tl.program_id(0)
    tl.store(Out + pid * 3, batch * (heads // GROUP) + kv_head)
    tl.store(Out + pid * 3 + 1, start_m // BLOCK_M)
    tl.store(Out + pid * 3 + 2, member)


@triton.jit
def _record_key_order(Out, n_k, SPLITS, BLOCK_N: tl.constexpr, SP, SC):
    pid_n, split, pid_bkv = _key_block_program(n_k, SPLITS, BLOCK_N, SP, SC)
    pid = tl.program_id(0)
    tl.store(Out + pid * 3, pid_bkv * SPLITS + split)
    tl.store(Out + pid * 3 + 1, pid_n)
    tl.store(Out + pid * 3 + 2, 0)


def _launch_order(kind, chunks, blocks, group, section):
    """What each program of a 1-D grid works on, in launch order, read back from the kernels' own
    mapping functions: (chunk, block, member); a chunk is one (batch, KV head), blocks are query
    blocks ("query", with ``group`` members each) or key blocks ("key"); ``section``: chunks per
    section, None for the plain order."""
    sp, sc = (1, 1) if section is None else (1 << 30, section)
    if kind == "query":
        n = chunks * blocks * group
        out = torch.full((n, 3), -1, dtype=torch.int32, device=DEVICE)
        _record_query_order[(n,)](out, 16 * blocks - 3, group * chunks // 2, group, 16, sp, sc)  # 2 batches
    else:
        n = chunks * blocks
        out = torch.full((n, 3), -1, dtype=torch.int32, device=DEVICE)
        _record_key_order[(n,)](out, 16 * blocks - 3, 1, 16, sp, sc)
    return [tuple(r) for r in out.tolist()]


@pytest.mark.parametrize("section", [None, 1, 4, 8])
@pytest.mark.parametrize("kind", ["query", "key"])
def test_launch_order_sections(kind, section):
    """Every (chunk, block, member) is launched exactly once; within a section the longest causal
    programs (last query blocks, first key blocks) of every chunk come first; one chunk per section
    (or none) is the plain chunk-by-chunk order."""
    chunks, blocks = 6, 5
    group = 2 if kind == "query" else 1
    order = _launch_order(kind, chunks, blocks, group, section)
    expected = {(c, b, m) for c in range(chunks) for b in range(blocks) for m in range(group)}
    assert len(order) == len(expected) and set(order) == expected
    size = 1 if section is None else min(section, chunks)
    per_chunk = blocks * group
    longest_first = (lambda b: -b) if kind == "query" else (lambda b: b)
    for start in range(0, chunks, size):
        part = order[start * per_chunk:(start + size) * per_chunk]
        assert {c for c, _, _ in part} == set(range(start, min(start + size, chunks)))
        keys = [longest_first(b) for _, b, _ in part]
        assert keys == sorted(keys), f"section at chunk {start}: blocks {[b for _, b, _ in part]}"
    if size == 1:
        assert order == sorted(order, key=lambda r: (r[0], longest_first(r[1]), r[2]))


# (batch, heads, kv_heads, n_q, n_k, head_dim, causal, dtype) for the non-default paths.
VARIANT_CASES = [
    (1, 4, 1, 37, 37, 64, True, torch.float32),
    (2, 4, 2, 33, 33, 64, False, torch.float32),
    (1, 4, 2, 7, 40, 64, True, torch.float32),
    (1, 2, 1, 29, 11, 64, True, torch.float32),
    (1, 4, 1, 21, 35, 128, False, torch.float16),
]


@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,head_dim,causal,dtype", VARIANT_CASES)
def test_atomic_dq_matches_float64_reference(monkeypatch, batch, heads, kv_heads, n_q, n_k, head_dim, causal,
                                             dtype):
    # dQ accumulated with fp32 atomics inside the dK/dV kernel (MGQA_TRITON_DETERMINISTIC=0).
    monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    launched = []
    monkeypatch.setattr(kernels, "_attn_bwd_dq", _Spy(kernels._attn_bwd_dq, launched))
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype)
    check_against_reference(q, k, v, causal)
    assert not launched, "the separate dQ kernel ran on the atomic path"


def test_atomic_dq_with_group_split(monkeypatch):
    monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    monkeypatch.setattr(kernels, "FORCE_DKDV_SPLITS", 2)
    q, k, v = make_inputs(1, 4, 1, 23, 23, 64, torch.float32)
    check_against_reference(q, k, v, causal=False)


def test_deterministic_algorithms_override_atomic_dq(monkeypatch):
    monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    launched = []
    monkeypatch.setattr(kernels, "_attn_bwd_dq", _Spy(kernels._attn_bwd_dq, launched))
    q, k, v = make_inputs(1, 2, 1, 9, 9, 64, torch.float32)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        kernels.triton_attention(q, k, v, causal=True).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert launched, "the deterministic dQ kernel did not run"


class _Spy:
    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]


def _gpu_launch_configs():
    """(kernel, block shape) of every launch configuration the GPU autotuners may pick. The
    interpreter ignores warps, stages and register caps, so each block shape is run once."""
    from mgqa.kernels import attention_bwd, attention_fwd

    seen = []
    for name, configs in [("fwd", attention_fwd.GPU_CONFIGS), ("dkdv", attention_bwd.DKDV_GPU_CONFIGS),
                          ("dq", attention_bwd.DQ_GPU_CONFIGS), ("dkdv_dq", attention_bwd.DKDV_DQ_GPU_CONFIGS)]:
        for cfg in configs:
            case = (name, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"])
            if case not in seen:
                seen.append(case)
    return seen


@pytest.mark.skipif(CUDA, reason="interpreter test; on a GPU the autotuned configs run in the gpu tests")
@pytest.mark.parametrize("kernel,block_m,block_n", _gpu_launch_configs(), ids=lambda x: str(x))
def test_every_gpu_block_shape_matches_reference(monkeypatch, kernel, block_m, block_n):
    """The block sizes of each GPU launch config on a ragged, bottom-right causal shape (Nq < Nk,
    neither a multiple of any block), where the interpreter's 16x16 default would hide a mask slip."""
    from mgqa.kernels import attention_bwd, attention_fwd

    import triton

    tuner = {"fwd": attention_fwd._attn_fwd, "dkdv": attention_bwd._attn_bwd_dkdv,
             "dq": attention_bwd._attn_bwd_dq, "dkdv_dq": attention_bwd._attn_bwd_dkdv_dq}[kernel]
    monkeypatch.setattr(tuner, "configs", [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4,
                                                          num_stages=1)])
    monkeypatch.setattr(tuner, "cache", {})
    if kernel == "dkdv_dq":
        monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    q, k, v = make_inputs(1, 4, 2, 139, 203, 64, torch.float32)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.parametrize("softmax", [1, 2])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,head_dim,causal,dtype", VARIANT_CASES)
def test_forward_softmax_variants(monkeypatch, softmax, batch, heads, kv_heads, n_q, n_k, head_dim, causal, dtype):
    # 1: scale folded into exp2's FMA; 2: plus lazy rescaling of the accumulator.
    monkeypatch.setattr(kernels, "FWD_SOFTMAX", softmax)
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype)
    check_against_reference(q, k, v, causal)


def test_lazy_rescaling_with_growing_scores(monkeypatch):
    # Scores that rise along the keys force rescales at some blocks and skip them at others.
    monkeypatch.setattr(kernels, "FWD_SOFTMAX", 2)
    q, k, v = make_inputs(1, 2, 1, 40, 40, 64, torch.float32)
    with torch.no_grad():
        k.mul_(torch.linspace(0.1, 6.0, 40).view(1, 1, 40, 1))
    check_against_reference(q, k, v, causal=False)


def test_custom_scale_and_ops_dispatch():
    q, k, v = make_inputs(1, 4, 2, 18, 18, 64, torch.float32)
    check_against_reference(q, k, v, causal=False, scale=0.3,
                            fn=lambda *a, **kw: mgqa.ops.attention(*a, backend="triton", **kw))


@pytest.mark.parametrize("aot", [False, True])
def test_compiled_custom_op_matches_eager_bit_for_bit(aot):
    """Eager calls take the autograd.Function, traced calls the mgqa:: custom ops; both launch the
    same kernels, so output and gradients agree exactly (and the trace has no graph break). With
    ``aot``, AOTAutograd also traces the backward through the ops' registered autograd formula, as
    the default torch.compile backend does."""
    q, k, v = make_inputs(2, 4, 2, 19, 23, 32, torch.float16 if CUDA else torch.float32, layout="strided")
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    eager = forward_backward(kernels.triton_attention, q, k, v, grad_out, causal=True)
    ops_seen = []

    def record(graph, example_inputs):  # record the ops in the traced graph, then run it as is
        ops_seen.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph.forward) if aot else graph.forward

    def backend(graph, example_inputs):
        if not aot:
            return record(graph, example_inputs)

        return aot_autograd(fw_compiler=record, bw_compiler=record)(graph, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: kernels.triton_attention(q, k, v, causal=True), backend=backend,
                             fullgraph=True)
    traced = forward_backward(lambda q, k, v, causal: compiled(q, k, v), q, k, v, grad_out, causal=True)
    assert any("gqa_attention_fwd" in op for op in ops_seen), ops_seen
    assert not aot or any("gqa_attention_bwd" in op for op in ops_seen), ops_seen
    for a, b in zip(traced, eager):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    """Gradients of gradients are not implemented: asking for them raises instead of returning
    silently wrong values."""
    q, k, v = make_inputs(1, 2, 1, 9, 9, 32, torch.float16 if CUDA else torch.float32)
    for call in (kernels.triton_attention, lambda q, k, v, causal: kernels._fwd_op(q, k, v, causal, 0.2)[0]):
        out = call(q, k, v, causal=True)  # eager (autograd.Function), then the custom op traced calls use
        with pytest.raises(RuntimeError, match=r"gradients of gradients \(create_graph=True\) are not supported"):
            torch.autograd.grad(out.sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad(kernels.triton_attention(q, k, v, causal=True).sum(), q)  # first order still works
    assert torch.isfinite(dq).all() and not dq.requires_grad


def test_rows_without_keys_are_zero_with_zero_grad():
    q, k, v = make_inputs(1, 2, 1, 20, 6, 64, torch.float32)
    out = kernels.triton_attention(q, k, v, causal=True)
    out.sum().backward()
    assert torch.all(out[:, :, :14] == 0) and torch.all(q.grad[:, :, :14] == 0)
    assert torch.all(out[:, :, 14:].abs().sum(-1) > 0)


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
        kernels.triton_attention(q, k, k.clone(), causal=True)


def test_mixed_dtypes_raise_value_error():
    q, k, v = make_inputs(1, 2, 1, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="mixed dtypes"):
        kernels.triton_attention(q, k.half(), v, causal=False)


def test_warp_specialised_forward_applies_only_where_measured():
    """The Gluon forward takes sm_90, head_dim 128, fp16/bf16 and a positive scale; anything else
    names why the tl kernel runs instead."""
    ws = pytest.importorskip("mgqa.kernels.attention_fwd_ws", reason="Gluon unavailable in this Triton")
    assert ws.unsupported_reason(128, "bfloat16", (9, 0), scale=0.088) is None
    assert ws.unsupported_reason(128, "float16", (9, 0), scale=1.0) is None
    assert "8.0" in ws.unsupported_reason(128, "bfloat16", (8, 0), scale=0.088)
    assert "10.0" in ws.unsupported_reason(128, "bfloat16", (10, 0), scale=0.088)
    assert "head_dim 64" in ws.unsupported_reason(64, "bfloat16", (9, 0), scale=0.125)
    assert "float32" in ws.unsupported_reason(128, "float32", (9, 0), scale=0.088)
    assert "scale -1.0" in ws.unsupported_reason(128, "bfloat16", (9, 0), scale=-1.0)


def test_warp_specialised_dkdv_applies_only_where_measured():
    ws = pytest.importorskip("mgqa.kernels.attention_bwd_ws", reason="Gluon unavailable in this Triton")
    assert ws.unsupported_reason(128, "bfloat16", (9, 0)) is None
    assert ws.unsupported_reason(128, "float16", (9, 0)) is None
    assert "8.9" in ws.unsupported_reason(128, "bfloat16", (8, 9))
    assert "head_dim 96" in ws.unsupported_reason(96, "bfloat16", (9, 0))
    assert "float32" in ws.unsupported_reason(128, "float32", (9, 0))


def test_warp_specialised_dq_applies_only_where_written_for():
    ws = pytest.importorskip("mgqa.kernels.attention_dq_ws", reason="Gluon unavailable in this Triton")
    assert ws.unsupported_reason(128, "float16", (9, 0)) is None
    assert "8.0" in ws.unsupported_reason(128, "bfloat16", (8, 0))
    assert "head_dim 64" in ws.unsupported_reason(64, "bfloat16", (9, 0))
    assert "float32" in ws.unsupported_reason(128, "float32", (9, 0))


def test_older_triton_falls_back_to_the_tl_kernels_with_the_reason(monkeypatch):
    monkeypatch.setattr(kernels, "_gluon_modules", {})
    monkeypatch.setattr(kernels.triton, "__version__", "3.4.0")
    assert kernels._triton_version() == (3, 4)
    reason = kernels._gluon_module("attention_fwd_ws")
    assert isinstance(reason, str) and "triton 3.4.0" in reason and "3.6" in reason


def test_gluon_dq_runs_by_default_and_tl_turns_it_off(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 8, 8, 128, torch.float32)
    assert kernels.DQ_IMPL == os.environ.get("MGQA_TRITON_DQ_IMPL", "auto")
    monkeypatch.setattr(kernels, "DQ_IMPL", "tl")
    assert kernels.ws_dq_reason(q, k, v, q) == "MGQA_TRITON_DQ_IMPL=tl"


class _FakeCudaTensor:
    """Shape and dtype of a CUDA tensor, for the Gluon dispatch logic on a machine without one."""
    is_cuda = True
    device = "cuda:0"

    def __init__(self, *shape, dtype=torch.bfloat16):
        self.shape, self.dtype = torch.Size(shape), dtype


def test_gluon_dispatch_reasons_on_an_h100(monkeypatch):
    """What the launchers pick on sm_90 with 132 SMs, checked without a GPU: each Gluon kernel where
    it applies, and the named reason where it does not."""
    pytest.importorskip("mgqa.kernels.attention_fwd_ws", reason="Gluon unavailable in this Triton")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(kernels, "_tma_ok", lambda *tensors: True)
    monkeypatch.setattr(kernels, "_DEVICE_INFO", {})  # asked again of the faked driver calls below
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: type("Props", (), {"multi_processor_count": 132})())
    q, k = _FakeCudaTensor(4, 32, 4096, 128), _FakeCudaTensor(4, 8, 4096, 128)
    assert kernels.ws_forward_reason(q, k, k, True, 0.088) is None
    assert kernels.ws_backward_reason(q, k, k, q) is None
    assert kernels.ws_dq_reason(q, k, k, q) is None
    for impl in ("persistent", "tiles"):  # the same kernel file and rules
        monkeypatch.setattr(kernels, "BWD_IMPL", impl)
        assert kernels.ws_backward_reason(q, k, k, q) is None
    monkeypatch.setattr(kernels, "BWD_IMPL", "tl")
    assert kernels.ws_backward_reason(q, k, k, q) == "MGQA_TRITON_BWD_IMPL=tl"
    monkeypatch.setattr(kernels, "BWD_IMPL", "auto")
    assert "scale -1.0" in kernels.ws_forward_reason(q, k, k, False, -1.0)
    short = _FakeCudaTensor(4, 8, 512, 128)  # the tl forward below 1k keys, causal or not
    assert "512 keys (the tl kernel is faster below 1024 with a causal mask)" in kernels.ws_forward_reason(
        q, short, short, True, 0.088)
    assert "512 keys" in kernels.ws_forward_reason(q, short, short, False, 0.088)
    kv_1k = _FakeCudaTensor(4, 8, 1024, 128)
    assert kernels.ws_forward_reason(q, kv_1k, kv_1k, True, 0.088) is None
    mqa = _FakeCudaTensor(4, 1, 4096, 128)  # 4 x 1 x 32 key blocks: under two per SM
    assert kernels._ws_backward_plan(q, mqa, mqa, q) == (4, None)  # four splits of the group of 32 fill it
    # Under a causal mask, twice the programs where the group allows (its sections' long tiles no
    # longer finish alone); Hkv=8's 1024 programs need no split either way.
    assert kernels._ws_backward_plan(q, mqa, mqa, q, causal=True) == (8, None)
    assert kernels._ws_backward_plan(q, k, k, q, causal=True) == (1, None)
    monkeypatch.setattr(kernels, "WS_BWD_MAX_SPLITS", 4)  # 8 not allowed: the unmasked rule's 4
    assert kernels._ws_backward_plan(q, mqa, mqa, q, causal=True) == (4, None)
    monkeypatch.setattr(kernels, "WS_BWD_MAX_SPLITS", 2)
    assert "with up to 2 group splits" in kernels.ws_backward_reason(q, mqa, mqa, q)
    monkeypatch.setattr(kernels, "WS_BWD_MAX_SPLITS", 1)
    assert kernels.ws_backward_reason(q, mqa, mqa, q).startswith("128 key-block programs (fewer than 2 per SM)")
    monkeypatch.setattr(kernels, "BWD_IMPL", "persistent")  # which does not split
    assert "128 key-block programs" in kernels.ws_backward_reason(q, mqa, mqa, q)
    monkeypatch.setattr(kernels, "BWD_IMPL", "auto")
    monkeypatch.setattr(kernels, "WS_BWD_MAX_SPLITS", 8)
    q1, tiny = _FakeCudaTensor(1, 32, 1024, 128), _FakeCudaTensor(1, 1, 1024, 128)  # 8 key blocks x 8 splits
    assert "8 key-block programs (fewer than 2 per SM with up to 8 group splits)" in \
        kernels.ws_backward_reason(q1, tiny, tiny, q1)
    q64, k64 = _FakeCudaTensor(4, 32, 4096, 64), _FakeCudaTensor(4, 8, 4096, 64)
    for reason in (kernels.ws_forward_reason(q64, k64, k64, True, 0.125), kernels.ws_backward_reason(q64, k64, k64, q64),
                   kernels.ws_dq_reason(q64, k64, k64, q64)):
        assert "head_dim 64" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(kernels, "_DEVICE_INFO", {})
    assert "8.0" in kernels.ws_forward_reason(q, k, k, True, 0.088)


def _fake_dkdv_kernel(calls: list):
    """A stand-in for attention_bwd_ws (no GPU needed): each launch records its choices in ``calls``
    and fills dK/dV with 0.5 / 0.25 and a float32 dQ buffer, when given, with 2.0 on its real rows
    and 99.0 on the overhang of the last query step."""

    class FakeKernel:
        BLOCK_M = BLOCK_N = 64

        @staticmethod
        def launch(q, k, v, grad_out, lse, delta, dk, dv, causal, qk_scale, scale, sections, persistent, splits,
                   dq_acc, tma_store):
            buffer = None
            if dq_acc is not None:
                buffer = dict(shape=tuple(dq_acc.shape), dtype=dq_acc.dtype, zero=bool((dq_acc == 0).all()))
                dq_acc[:, :, :q.shape[2]] = 2.0
                dq_acc[:, :, q.shape[2]:] = 99.0
            calls.append(dict(persistent=persistent, splits=splits, dq_acc=buffer, tma_store=tma_store))
            dk.fill_(0.5)
            dv.fill_(0.25)

    return FakeKernel


def test_fused_dq_path_scales_the_float32_buffer_and_drops_its_padding(monkeypatch):
    """With determinism off where the Gluon dK/dV kernel applies, attention_backward hands it a zeroed
    float32 dQ buffer padded to its query step, then returns dQ = buffer x scale for the real rows."""
    calls = []
    monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    monkeypatch.setattr(kernels, "BWD_IMPL", "persistent")  # the persistent kernel has no fused dQ
    monkeypatch.setattr(kernels, "_ws_backward_plan", lambda *args: (1, None))
    monkeypatch.setattr(kernels, "_gluon_module", lambda name: _fake_dkdv_kernel(calls))
    monkeypatch.setattr(kernels, "_sections", lambda *args: {"SECTION_PROGRAMS": 1, "SECTION_CHUNKS": 1})
    q, k, v = make_inputs(1, 4, 2, 100, 100, 32, torch.float32)
    out, lse = kernels.attention_forward(q, k, v, True, 0.5)
    dq, dk, dv = kernels.attention_backward(torch.ones_like(out), q, k, v, out, lse, True, 0.5)
    assert calls == [dict(persistent=False, splits=1, tma_store=True,
                          dq_acc=dict(shape=(1, 4, 128, 32), dtype=torch.float32, zero=True))]
    assert torch.all(dq == 1.0) and dq.shape == q.shape and dq.dtype == q.dtype  # 2.0 x scale 0.5
    assert torch.all(dk == 0.5) and torch.all(dv == 0.25)


@pytest.mark.parametrize("impl,kv_heads,expected", [
    ("auto", 4, True),  # MHA: each key tile's program would cover one head
    ("auto", 2, False),
    ("tiles", 4, False),
    ("persistent", 2, True),
])
def test_dkdv_kernel_is_persistent_for_mha_by_default(monkeypatch, impl, kv_heads, expected):
    """Where the Gluon dK/dV kernel runs, the default takes its persistent variant for MHA only;
    MGQA_TRITON_BWD_IMPL=tiles and =persistent force one or the other (checked with a stand-in for
    the kernel, whose dK/dV reach the caller)."""
    calls = []
    monkeypatch.setattr(kernels, "BWD_IMPL", impl)
    monkeypatch.setattr(kernels, "_ws_backward_plan", lambda *args: (1, None))
    monkeypatch.setattr(kernels, "_gluon_module", lambda name: _fake_dkdv_kernel(calls))
    q, k, v = make_inputs(1, 4, kv_heads, 100, 100, 32, torch.float32)
    out, lse = kernels.attention_forward(q, k, v, True, 0.5)
    dq, dk, dv = kernels.attention_backward(torch.ones_like(out), q, k, v, out, lse, True, 0.5)
    assert calls == [dict(persistent=expected, splits=1, dq_acc=None, tma_store=True)]
    assert torch.all(dk == 0.5) and torch.all(dv == 0.25)


@pytest.mark.parametrize("impl,causal,first_free,expected", [
    ("auto", True, True, dict(persistent=True, first_free=True, pingpong=False)),
    ("auto", False, True, dict(persistent=True, first_free=False, pingpong=False)),  # equal tiles: strided
    ("auto", True, False, dict(persistent=True, first_free=False, pingpong=False)),
    ("tiles", True, True, dict(persistent=False, first_free=False, pingpong=False)),
])
def test_persistent_forward_takes_first_free_lists_under_a_causal_mask(monkeypatch, impl, causal, first_free,
                                                                      expected):
    """Where the Gluon forward runs, the default is persistent, its tiles assigned by first-free lists
    under a causal mask only (without one every tile costs the same); MGQA_TRITON_FWD_IMPL=tiles
    launches one program per tile (checked with a stand-in for the kernel, whose output reaches the
    caller)."""
    calls = []

    class FakeForward:
        @staticmethod
        def launch(q, k, v, out, lse, causal, qk_scale, sections, pingpong, persistent, first_free):
            calls.append(dict(persistent=persistent, first_free=first_free, pingpong=pingpong))
            out.fill_(0.5)
            lse.fill_(1.0)

    monkeypatch.setattr(kernels, "FWD_IMPL", impl)
    monkeypatch.setattr(kernels, "WS_FWD_FIRST_FREE", first_free)
    monkeypatch.setattr(kernels, "ws_forward_reason", lambda *args: None)
    monkeypatch.setattr(kernels, "_gluon_module", lambda name: FakeForward)
    monkeypatch.setattr(kernels, "_sections", lambda *args: {"SECTION_PROGRAMS": 1, "SECTION_CHUNKS": 1})
    q, k, v = make_inputs(1, 4, 2, 100, 100, 32, torch.float32)
    out, lse = kernels.attention_forward(q, k, v, causal, 0.5)
    assert calls == [expected]
    assert torch.all(out == 0.5) and torch.all(lse == 1.0)


@pytest.mark.parametrize("chunks,per_chunk,expected", [
    (64, 32, 8),  # 9 fit in L2: 8 sections of 8, not 7 of 9 and a last of 1
    (16, 32, 8),  # 9 fit: 2 sections of 8
    (9, 32, 9),
    (64, 128, 5),  # 5 chunks give 4 waves of programs: 13 sections of 5 (the last of 4)
])
def test_causal_sections_are_even(monkeypatch, chunks, per_chunk, expected):
    """The causal dK/dV launch order's sections hold as many chunks as L2 allows, evened out over the
    launch, so that no last section holds a few chunks whose long programs start last."""
    monkeypatch.setattr(kernels, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    device = torch.device("cuda", 0)
    l2 = 60 * 2 ** 20
    monkeypatch.setattr(kernels, "_DEVICE_INFO", {device: ((9, 0), 132, l2)})
    chunk_bytes = 4 * 2 ** 20  # int(0.65 * 60 MiB) // 4 MiB = 9 chunks fit
    sections = kernels._sections("dkdv", True, chunk_bytes, device, chunks, per_chunk)
    assert sections == dict(SECTION_PROGRAMS=4 * 132, SECTION_CHUNKS=expected)
    ws = pytest.importorskip("mgqa.kernels.attention_bwd_ws", reason="Gluon unavailable in this Triton")
    order = ws.launch_order(per_chunk, chunks, sections["SECTION_PROGRAMS"], sections["SECTION_CHUNKS"])
    assert sorted(order) == [(c, n) for c in range(chunks) for n in range(per_chunk)]  # each tile once
    section_chunks = [len({c for c, _ in order[i:i + expected * per_chunk]})
                      for i in range(0, len(order), expected * per_chunk)]
    assert max(section_chunks) - min(section_chunks) <= 1  # no short last section
    assert kernels._sections("dkdv", True, chunk_bytes, device) == dict(SECTION_PROGRAMS=4 * 132, SECTION_CHUNKS=9)
    assert kernels._sections("dkdv", False, chunk_bytes, device, chunks, per_chunk) == \
        dict(SECTION_PROGRAMS=1, SECTION_CHUNKS=1)
    monkeypatch.setattr(kernels, "EVEN_SECTIONS", False)
    assert kernels._sections("dkdv", True, chunk_bytes, device, chunks, per_chunk)["SECTION_CHUNKS"] == 9


def test_off_cuda_names_why_the_gluon_kernels_are_skipped(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 8, 8, 128, torch.float32)
    if not CUDA:
        assert "not on a CUDA device" in kernels.ws_forward_reason(q, k, v, True, 0.088)
        assert "not on a CUDA device" in kernels.ws_backward_reason(q, k, v, q)
        monkeypatch.setattr(kernels, "FWD_IMPL", "tiles")  # still the Gluon forward, one program per tile
        assert "not on a CUDA device" in kernels.ws_forward_reason(q, k, v, True, 0.088)
    monkeypatch.setattr(kernels, "FWD_IMPL", "tl")
    monkeypatch.setattr(kernels, "BWD_IMPL", "tl")
    assert kernels.ws_forward_reason(q, k, v, True, 0.088) == "MGQA_TRITON_FWD_IMPL=tl"
    assert kernels.ws_backward_reason(q, k, v, q) == "MGQA_TRITON_BWD_IMPL=tl"


# ----------------------------------------------------------------------------- GPU only
GPU_CASES = [
    (2, 8, 2, 1000, 1000, 128, True),
    (1, 8, 1, 333, 1111, 64, True),
    (1, 4, 4, 257, 129, 32, False),
    (1, 4, 2, 517, 517, 96, True),
    (1, 4, 1, 300, 300, 256, True),
    (2, 4, 2, 1, 513, 128, True),
    (2, 4, 4, 700, 700, 128, True),  # causal MHA: the dK/dV kernel's single flattened query loop
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,head_dim,causal", GPU_CASES)
def test_gpu_matches_reference(batch, heads, kv_heads, n_q, n_k, head_dim, causal, dtype):
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype, layout="strided")
    check_against_reference(q, k, v, causal)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("softmax", [0, 2])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,head_dim,causal", GPU_CASES[:4])
def test_gpu_atomic_dq_and_lazy_softmax(monkeypatch, softmax, batch, heads, kv_heads, n_q, n_k, head_dim, causal):
    monkeypatch.setattr(kernels, "DETERMINISTIC", False)
    monkeypatch.setattr(kernels, "FWD_SOFTMAX", softmax)
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, torch.bfloat16, layout="strided")
    check_against_reference(q, k, v, causal, label=f"atomic_dq_softmax{softmax}:bf16")


@pytest.mark.gpu
@gpu
def test_gpu_float32():
    q, k, v = make_inputs(1, 4, 2, 300, 300, 128, torch.float32)
    check_against_reference(q, k, v, causal=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,causal", [(4096, True), (16384, True), (16384, False)])
def test_gpu_long_sequences(n, causal, dtype):
    # The float64 oracle at 16k would take (H, N, N) doubles; float32 upcast is already far
    # more precise than the half-precision kernels, so it serves as the oracle here.
    q, k, v = make_inputs(1, 4, 1, n, n, 128, dtype)
    grad_out = torch.randn(q.shape, dtype=dtype, device=DEVICE)
    ref = forward_backward(reference_attention, q, k, v, grad_out, causal=causal, upcast=torch.float32)
    same = forward_backward(reference_attention, q, k, v, grad_out, causal=causal, upcast=dtype)
    mine = forward_backward(kernels.triton_attention, q, k, v, grad_out, causal=causal)
    ref = [r.double() for r in ref]
    for name, x, t, r in zip(("out", "dq", "dk", "dv"), mine, same, ref):
        err, err_torch = rel_err(x, r), rel_err(t, r)
        record_error(f"{dtype}:{name}", err)
        assert err <= K_SLACK * err_torch + ATOL[dtype], f"{name}: rel err {err:.2e} vs torch {err_torch:.2e}"


@pytest.mark.gpu
@gpu
def test_gpu_deterministic():
    q, k, v = make_inputs(2, 8, 2, 777, 777, 128, torch.bfloat16)
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    first = forward_backward(kernels.triton_attention, q, k, v, grad_out, causal=True)
    second = forward_backward(kernels.triton_attention, q, k, v, grad_out, causal=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v = make_inputs(2, 8, 2, 256, 256, 64, torch.bfloat16, layout="strided")

    def block(q, k, v):
        return (mgqa.ops.attention(q, k, v, causal=True, backend="triton") * 2).sum()

    compiled = torch.compile(block, fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(block(q, k, v), (q, k, v))
    for a, b in zip(grads, eager):
        assert torch.allclose(a, b, atol=1e-2, rtol=1e-2)


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
    (4, 8, 8, 1024, 1024, True),  # 256 key tiles: a persistent program takes one or two on an H100
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("schedule", ["together", "pingpong", "persistent", "persistent_first_free"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", WS_CASES)
def test_gpu_warp_specialised_forward(monkeypatch, batch, heads, kv_heads, n_q, n_k, causal, dtype, schedule):
    """On sm_90 the Gluon forward runs these inputs (one program per query tile, its consumers
    issuing matmuls together or taking turns, or persistent: a few programs each walking several
    tiles, some more than others, strided or from first-free lists); its out and lse match the tl kernel's (lse +inf on the same
    rows), and forward+backward through it matches the float64 reference."""
    impl = "auto" if schedule.startswith("persistent") else "tiles"
    monkeypatch.setattr(kernels, "WS_FWD_PINGPONG", schedule == "pingpong")
    monkeypatch.setattr(kernels, "WS_FWD_FIRST_FREE", schedule == "persistent_first_free")
    monkeypatch.setattr(kernels, "FWD_IMPL", impl)
    module = kernels._gluon_module("attention_fwd_ws")
    if schedule.startswith("persistent") and not isinstance(module, str):
        monkeypatch.setattr(module, "MAX_PROGRAMS", 3)
    monkeypatch.setattr(kernels, "WS_MIN_KEYS", 1)  # short cases exercise the masks
    monkeypatch.setattr(kernels, "WS_MIN_KEYS_CAUSAL", 1)
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    scale = 128 ** -0.5
    reason = kernels.ws_forward_reason(q, k, v, causal, scale)
    if torch.cuda.get_device_capability() != (9, 0):
        assert reason is not None
        pytest.skip(f"the warp-specialised forward does not run here: {reason}")
    assert reason is None
    out_ws, lse_ws = kernels.attention_forward(q, k, v, causal, scale)
    monkeypatch.setattr(kernels, "FWD_IMPL", "tl")
    out_tl, lse_tl = kernels.attention_forward(q, k, v, causal, scale)
    monkeypatch.setattr(kernels, "FWD_IMPL", impl)
    assert torch.equal(torch.isinf(lse_ws), torch.isinf(lse_tl))
    seen = torch.isfinite(lse_tl)
    assert torch.allclose(lse_ws[seen], lse_tl[seen], atol=1e-3, rtol=1e-4)
    assert torch.allclose(out_ws.float(), out_tl.float(), atol=ATOL[dtype], rtol=1e-2)
    assert torch.all(out_ws[~seen] == 0)
    check_against_reference(q, k, v, causal, scale=scale, label=f"ws_fwd:{dtype}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["dkdv", "dkdv_persistent", "dkdv_persistent_regs", "dq", "dq_serial", "dq_pingpong",
                                  "dkdv_dq"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", WS_CASES)
def test_gpu_warp_specialised_backward(monkeypatch, kind, batch, heads, kv_heads, n_q, n_k, causal, dtype):
    """On sm_90 the Gluon dK/dV kernel (one program per key tile, or persistent, storing dK/dV from
    registers or by the copy engine; or computing dQ too, with atomics, when determinism is off) or
    dQ kernel (it also writes delta for dK/dV; each block's dQ matmul issued with the next block's S
    and dP, by default, with the consumers taking turns too, or after its own S and dP) runs
    these inputs; dq, dk, dv match the tl deterministic backward's, and forward+backward through it
    matches the float64 reference."""
    if kind == "dkdv_persistent_regs":  # dK/dV stored from registers, not by the copy engine
        monkeypatch.setattr(kernels, "WS_DKDV_TMA_STORE", False)
        kind = "dkdv_persistent"
    if kind.startswith("dq_"):
        overlap, pingpong = {"dq_serial": (False, False), "dq_pingpong": (True, True)}[kind]
        monkeypatch.setattr(kernels, "WS_DQ_OVERLAP", overlap)
        monkeypatch.setattr(kernels, "WS_DQ_PINGPONG", pingpong)
        kind = "dq"
    flag, value, off = {"dkdv": ("BWD_IMPL", "tiles", "tl"), "dkdv_persistent": ("BWD_IMPL", "persistent", "tl"),
                        "dq": ("DQ_IMPL", "auto", "tl"), "dkdv_dq": ("DETERMINISTIC", False, True)}[kind]
    monkeypatch.setattr(kernels, "WS_BWD_MIN_PROGRAMS_PER_SM", 0)  # small cases exercise the masks
    module = kernels._gluon_module("attention_bwd_ws")
    if kind == "dkdv_persistent" and n_k < 1024 and not isinstance(module, str):
        # Few programs, so that each walks several tiles, some more than others, through both K/V
        # buffer sets.
        monkeypatch.setattr(module, "MAX_PROGRAMS", 3)
    reason_of = kernels.ws_dq_reason if kind == "dq" else kernels.ws_backward_reason
    if kind == "dkdv_dq":
        monkeypatch.setattr(kernels, "DQ_IMPL", "tl")  # the deterministic side: tl dQ + Gluon dK/dV
    _check_gluon_backward(monkeypatch, flag, value, reason_of, kind, batch, heads, kv_heads, n_q, n_k, causal, dtype,
                          off=off)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,heads,kv_heads,n_q,n_k,causal", [
    (1, 8, 2, 37, 37, True),
    (2, 8, 1, 100, 300, True),
    (1, 4, 1, 191, 4097, False),
])
@pytest.mark.parametrize("fused_dq", [False, True])
def test_gpu_warp_specialised_backward_split_over_the_group(monkeypatch, batch, heads, kv_heads, n_q, n_k, causal,
                                                            dtype, fused_dq):
    """Where there are too few key tiles, the Gluon dK/dV kernel may split each group over several
    programs (float32 partials, summed afterwards): here as many splits as the group has heads; with
    determinism off, each split program also adds its heads' dQ."""
    monkeypatch.setattr(kernels, "DETERMINISTIC", not fused_dq)
    group = heads // kv_heads
    tiles = batch * kv_heads * triton.cdiv(n_k, 128)
    if CUDA:  # exactly group x tiles programs needed: the most splits
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        monkeypatch.setattr(kernels, "WS_BWD_MIN_PROGRAMS_PER_SM", (group * tiles - 0.5) / sms)
    monkeypatch.setattr(kernels, "WS_BWD_MAX_SPLITS", group)

    def reason_of(q, k, v, grad_out):
        splits, reason = kernels._ws_backward_plan(q, k, v, grad_out)
        assert reason is not None or splits == group
        return reason

    _check_gluon_backward(monkeypatch, "WS_BWD_MAX_SPLITS", group, reason_of, "dkdv_split", batch, heads, kv_heads,
                          n_q, n_k, causal, dtype, off=1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("chunks", [2, 3])
def test_gpu_warp_specialised_sectioned_order_gives_identical_results(monkeypatch, chunks):
    """The Gluon forward and dQ kernels in the sectioned causal launch order (a few (batch, KV head)
    chunks per section; with 3 of the 4 chunks the last section is ragged) still compute every query
    block once: out, lse and the gradients are bit-identical to the plain order's."""
    monkeypatch.setattr(kernels, "WS_MIN_KEYS_CAUSAL", 1)
    q, k, v = make_inputs(2, 8, 2, 700, 700, 128, torch.bfloat16, layout="strided")
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=DEVICE)
    scale = 128 ** -0.5
    reasons = (kernels.ws_forward_reason(q, k, v, True, scale), kernels.ws_dq_reason(q, k, v, grad_out))
    if torch.cuda.get_device_capability() != (9, 0):
        assert all(reason is not None for reason in reasons)
        pytest.skip(f"the warp-specialised kernels do not run here: {reasons}")
    assert reasons == (None, None)

    def run():
        out, lse = kernels.attention_forward(q, k, v, True, scale)
        return (out, lse, *kernels.attention_backward(grad_out, q, k, v, out, lse, True, scale))

    assert kernels._sections("ws_fwd", True, 1, q.device)["SECTION_CHUNKS"] == 1  # the plain order by default
    plain = run()
    monkeypatch.setattr(kernels, "SECTION_KERNELS", ("dkdv", "ws_fwd", "ws_dq"))
    monkeypatch.setattr(kernels, "FORCE_SECTION_CHUNKS", chunks)
    sectioned = run()
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), sectioned, plain):
        assert torch.equal(a, b), name


def _check_gluon_backward(monkeypatch, flag, value, reason_of, kind, batch, heads, kv_heads, n_q, n_k, causal, dtype,
                          off="tl"):
    """With kernels.<flag> = value a Gluon backward kernel runs (reason_of says none is missing);
    with <flag> = off the tl one does; both agree, and the Gluon path matches float64."""
    monkeypatch.setattr(kernels, flag, value)
    q, k, v = make_inputs(batch, heads, kv_heads, n_q, n_k, 128, dtype, layout="strided")
    grad_out = torch.randn(q.shape, dtype=dtype, device=DEVICE)
    reason = reason_of(q, k, v, grad_out)
    if torch.cuda.get_device_capability() != (9, 0):
        assert reason is not None
        pytest.skip(f"the warp-specialised {kind} kernel does not run here: {reason}")
    assert reason is None
    scale = 128 ** -0.5
    out, lse = kernels.attention_forward(q, k, v, causal, scale)
    ws = kernels.attention_backward(grad_out, q, k, v, out, lse, causal, scale)
    monkeypatch.setattr(kernels, flag, off)
    tl_grads = kernels.attention_backward(grad_out, q, k, v, out, lse, causal, scale)
    monkeypatch.setattr(kernels, flag, value)
    for name, a, b in zip(("dq", "dk", "dv"), ws, tl_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b.double()) < 2e-2, name
    check_against_reference(q, k, v, causal, scale=scale, label=f"ws_{kind}:{dtype}")
