import math

import pytest
import torch

from mgqa import ops
from mgqa.ops import BackendUnavailable, attention, causal_mask, reference_attention


def naive_mha(q, k, v, causal, scale=None):
    """Textbook attention with each KV head copied to its group of query heads, in float64."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scale = scale or 1 / math.sqrt(q.shape[-1])
    s = q.double() @ k.transpose(-1, -2) * scale
    if causal:
        n_q, n_k = q.shape[2], k.shape[2]
        for i in range(n_q):
            s[:, :, i, n_k - n_q + i + 1 :] = float("-inf")
    return torch.nan_to_num(torch.softmax(s, -1)) @ v


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("heads, kv_heads", [(8, 1), (8, 2), (8, 8), (6, 3)])
@pytest.mark.parametrize("n_q, n_k", [(1, 1), (7, 7), (1, 9), (4, 11), (33, 33)])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_equals_mha_with_copied_kv(backend, heads, kv_heads, n_q, n_k, causal):
    torch.manual_seed(n_q * 100 + n_k)
    q = torch.randn(2, heads, n_q, 16, dtype=torch.float64)
    k = torch.randn(2, kv_heads, n_k, 16, dtype=torch.float64)
    v = torch.randn(2, kv_heads, n_k, 16, dtype=torch.float64)
    out = attention(q, k, v, causal=causal, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, naive_mha(q, k, v, causal), rtol=1e-9, atol=1e-9)


def test_sdpa_float32_close_to_float64_reference_on_strided_inputs():
    torch.manual_seed(0)
    qkv = torch.randn(2, 13, (8 + 2 * 2) * 32)  # a fused projection, as the model produces
    q, k, v = qkv.split((8 * 32, 2 * 32, 2 * 32), dim=-1)
    q = q.view(2, 13, 8, 32).transpose(1, 2)
    k = k.view(2, 13, 2, 32).transpose(1, 2)
    v = v.view(2, 13, 2, 32).transpose(1, 2)
    assert not q.is_contiguous()
    ref = reference_attention(q, k, v, causal=True, upcast=torch.float64)
    out = attention(q, k, v, causal=True, backend="sdpa", scale=0.1)
    ref_scaled = reference_attention(q, k, v, causal=True, scale=0.1, upcast=torch.float64)
    assert not torch.allclose(ref, ref_scaled)
    torch.testing.assert_close(out, ref_scaled, rtol=1e-5, atol=1e-5)


def test_causal_mask_is_bottom_right_aligned():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_auto_on_cpu_uses_sdpa_and_logs_once(caplog):
    q = torch.randn(1, 4, 5, 8)
    k = v = torch.randn(1, 2, 5, 8)
    ops._announced.clear()
    with caplog.at_level("INFO", logger="mgqa.ops"):
        attention(q, k, v, causal=True)
        attention(q, k, v, causal=True)
    messages = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert messages == ["attention backend 'auto' chose sdpa (inputs on cpu)"]


def test_unknown_and_unavailable_backends_raise_clear_errors():
    q = torch.randn(1, 4, 5, 8)
    k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        attention(q, k, v, causal=True, backend="flash3")
    with pytest.raises(BackendUnavailable, match="backend='triton' has no attention dropout"):
        attention(q, k, v, causal=True, backend="triton", dropout_p=0.1)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 4, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8)), r"query heads \(4\) must be a multiple of KV heads \(3\)"),
        (((1, 4, 5, 8), (1, 2, 5, 16), (1, 2, 5, 16)), "must agree on batch"),
        (((1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 6, 8)), "k and v must have the same shape"),
        (((4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)), "expects 4-d"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, causal=False, backend="sdpa")


def _auto(**overrides):
    from mgqa.ops import auto_choice

    call = dict(device_type="cuda", dropout_p=0.0, cudnn_ready=False, dtype=torch.bfloat16, head_dim=128, triton_unsupported=None)
    return auto_choice(**{**call, **overrides})


def test_auto_takes_cudnn_where_sdpa_runs_it_and_triton_elsewhere_on_cuda():
    assert _auto(cudnn_ready=True)[0] == "sdpa"
    assert "cuDNN" in _auto(cudnn_ready=True)[1]
    assert _auto(cudnn_ready=True, dtype=torch.float32)[0] == "triton"  # cuDNN attention is fp16/bf16 only
    assert _auto(cudnn_ready=True, head_dim=256)[0] == "triton"
    assert _auto()[0] == "triton"
    assert _auto(triton_unsupported="head_dim 48 not in (...)") == ("sdpa", "head_dim 48 not in (...)")
    asked = []
    assert _auto(cudnn_ready=True, triton_unsupported=lambda: asked.append(1))[0] == "sdpa" and not asked  # not asked
    assert _auto(dropout_p=0.1)[0] == "sdpa"
    assert _auto(device_type="cpu") == ("sdpa", "inputs on cpu")


def test_decode_reference_zeroes_empty_rows_by_the_mask_and_keeps_nans():
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    lengths = torch.tensor([0, 3])
    out = ops.reference_decode_attention(q, k, v, lengths, causal=False)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out[1]).all()
    k[1, 0, 1] = float("nan")  # a NaN in a visible position reaches the output, as with SDPA
    assert torch.isnan(ops.reference_decode_attention(q, k, v, lengths, causal=False)[1, :2]).all()
