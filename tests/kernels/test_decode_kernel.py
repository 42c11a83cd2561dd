"""The Triton decode kernel against the float64 reference (CPU: Triton's interpreter, fp32/fp16).

The interpreter's key tiles are 16 wide, so caches of 20-70 positions cover one tile, several
tiles, ragged tails and splits that get no keys at all. bf16 and the issue's long-context shapes
are in tests/kernels/test_decode_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from mgqa import ops
from mgqa.kernels import decode as kernels
from mgqa.kernels.plan import DECODE_MAX_SPLITS, decode_splits
from mgqa.ops.reference import cache_mask, reference_decode_attention

K_SLACK = 4.0
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output and partial starts as NaN (PyTorch fills fresh memory so under deterministic
    algorithms): an element left unwritten fails the test."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(x).all(), "non-finite values in the result"
    return ((x.double() - ref).norm() / ref.norm()).item()


def inputs(batch, heads, kv_heads, n_q, head_dim, capacity, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize(
    "batch, heads, kv_heads, n_q, head_dim, capacity",
    [
        (2, 8, 2, 1, 64, 37),  # GQA, one query, ragged tail
        (1, 4, 1, 1, 128, 50),  # MQA, batch 1, head_dim 128
        (3, 4, 4, 2, 64, 21),  # MHA, two queries (a speculative step)
        (2, 6, 3, 8, 24, 45),  # eight queries, head_dim not a power of two
        (1, 16, 1, 8, 16, 20),  # 128 rows: two row blocks per KV head
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_kernel_matches_reference(batch, heads, kv_heads, n_q, head_dim, capacity, dtype, causal):
    q, k, v = inputs(batch, heads, kv_heads, n_q, head_dim, capacity, dtype, seed=capacity * 7 + n_q)
    lengths = torch.randint(n_q, capacity + 1, (batch,), dtype=torch.int32)
    lengths[0] = capacity  # one sequence fills the cache
    out = kernels.decode_attention(q, k, v, lengths, causal=causal)
    oracle = reference_decode_attention(q, k, v, lengths, causal=causal, upcast=torch.float64).double()
    same_dtype = reference_decode_attention(q, k, v, lengths, causal=causal, upcast=dtype)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, oracle) <= K_SLACK * rel_err(same_dtype, oracle) + ATOL[dtype]


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_split_counts_agree_and_empty_splits_write_nothing_wrong(splits):
    # 7 splits of a 40-position cache holding 3..40 positions: most splits of short sequences see no key.
    q, k, v = inputs(3, 8, 2, 1, 32, 40, torch.float32, seed=splits)
    lengths = torch.tensor([40, 3, 17], dtype=torch.int32)
    out = kernels.decode_attention(q, k, v, lengths, splits=splits)
    oracle = reference_decode_attention(q, k, v, lengths, upcast=torch.float64).double()
    torch.testing.assert_close(out.double(), oracle, rtol=1e-5, atol=1e-5)


def test_positions_past_a_sequence_length_are_never_read():
    q, k, v = inputs(2, 4, 2, 1, 32, 30, torch.float32, seed=3)
    lengths = torch.tensor([12, 30], dtype=torch.int64)
    before = kernels.decode_attention(q, k, v, lengths)
    k[0, :, 12:], v[0, :, 12:] = float("nan"), float("nan")  # garbage after sequence 0's length
    after = kernels.decode_attention(q, k, v, lengths)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_ops_decode_backends_agree_and_auto_takes_sdpa_on_cpu(caplog):
    q, k, v = inputs(2, 8, 2, 1, 32, 25, torch.float32, seed=5)
    lengths = torch.tensor([25, 9], dtype=torch.int32)
    expected = reference_decode_attention(q, k, v, lengths, upcast=torch.float64).double()
    ops._announced.clear()
    with caplog.at_level("INFO", logger="mgqa.ops"):
        for backend in ("auto", "sdpa", "reference", "triton"):
            out = ops.decode_attention(q, k, v, lengths, backend=backend)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert "chose sdpa decode (inputs on cpu)" in caplog.text


def test_cache_mask_per_sequence():
    mask = cache_mask(torch.tensor([3, 5]), 2, 5, causal=True)  # (B, 1, Nq, L)
    assert mask[0, 0].tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    assert mask[1, 0].tolist() == [[True, True, True, True, False], [True] * 5]
    assert cache_mask(torch.tensor([3]), 2, 5, causal=False)[0, 0, 0].tolist() == [True, True, True, False, False]


def test_num_splits_rule():
    # B=32, Hkv=8 on 132 SMs: 256 programs, two splits reach three programs per SM.
    assert decode_splits(256, 8192, 132, 64) == 2
    # One long sequence: the splits fill the GPU, capped at MAX_SPLITS.
    assert decode_splits(8, 131072, 132, 64) == 50
    assert decode_splits(1, 1 << 20, 132, 64) == DECODE_MAX_SPLITS
    # A short cache is not cut below four key tiles per split; a full GPU takes one split.
    assert decode_splits(8, 300, 132, 64) == 2
    assert decode_splits(1024, 8192, 132, 64) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, n: (q.expand(-1, -1, 9, -1), k, v, n), "9 query rows"),
        (lambda q, k, v, n: (q[..., :12], k[..., :12], v[..., :12], n), "head_dim 12"),
        (lambda q, k, v, n: (q, k.half(), v, n), "mixed dtypes"),
        (lambda q, k, v, n: (q, k, v, n[:1]), r"lengths must be an integer tensor of shape \(2,\)"),
        (lambda q, k, v, n: (q, k, v, n.float()), "lengths must be an integer tensor"),
        (lambda q, k, v, n: (q[:, :6], k[:, :4], v[:, :4], n), r"query heads \(6\) not a multiple of KV heads \(4\)"),
        (lambda q, k, v, n: (q.double(), k.double(), v.double(), n), "dtype torch.float64"),
    ],
)
def test_bad_inputs_are_refused_naming_the_value(change, message):
    q, k, v = inputs(2, 8, 4, 1, 32, 20, torch.float32, seed=0)
    lengths = torch.tensor([20, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match=message):
        kernels.decode_attention(*change(q, k, v, lengths))
    with pytest.raises(ValueError, match="splits must be in 1..128, got 0"):
        kernels.decode_attention(q, k, v, lengths, splits=0)


def test_triton_decode_refuses_inputs_that_need_gradients():
    q, k, v = inputs(1, 4, 2, 1, 32, 20, torch.float32, seed=1)
    lengths = torch.tensor([20])
    q.requires_grad_()
    with pytest.raises(ops.BackendUnavailable, match="gradients are needed"):
        ops.decode_attention(q, k, v, lengths, backend="triton")
    out = ops.decode_attention(q, k, v, lengths, backend="sdpa")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
