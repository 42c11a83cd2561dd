"""The chunked linear + cross-entropy against ``F.cross_entropy`` on the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mgqa.ops.cross_entropy import _accumulate, linear_cross_entropy


def _inputs(rows: int, dim: int, vocab: int, dtype: torch.dtype = torch.float64):
    hidden = torch.randn(rows, dim, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, dim, dtype=dtype) / dim**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64])
@pytest.mark.parametrize("ignore", [False, True])
def test_matches_cross_entropy_with_gradients(chunk_rows: int | None, ignore: bool) -> None:
    hidden, weight, targets = _inputs(37, 16, 53)
    if ignore:
        targets[::3] = -100
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grad_h, grad_w = torch.autograd.grad(loss * 2.5, (hidden, weight))
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    ref_h, ref_w = torch.autograd.grad(ref * 2.5, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-10, atol=1e-12)


def test_batched_shapes_and_no_grad_path_agree() -> None:
    hidden, weight, targets = _inputs(24, 8, 11, torch.float32)
    with_grad = linear_cross_entropy(hidden.view(2, 12, 8), weight, targets.view(2, 12), chunk_rows=5)
    with torch.no_grad():
        without = linear_cross_entropy(hidden.view(2, 12, 8), weight, targets.view(2, 12), chunk_rows=5)
    ref = F.cross_entropy(hidden @ weight.T, targets)
    torch.testing.assert_close(with_grad, ref)
    torch.testing.assert_close(without, ref)
    assert not without.requires_grad


def test_bf16_autocast_matches_autocast_linear() -> None:
    """Under autocast the product runs in bf16 like nn.Linear would; gradients reach float32 weights."""
    hidden, weight, targets = _inputs(64, 32, 97, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    loss.backward()
    grad_w = weight.grad.clone()
    weight.grad = None
    ref.backward()
    assert weight.grad.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_w, weight.grad, rtol=5e-2, atol=2e-3)


def test_under_autocast_a_float32_weight_gets_the_float32_sum_unrounded() -> None:
    """The float32 sum of the chunks' products reaches the float32 weight as it is, not rounded to
    bf16 on the way (a bf16 round trip would leave every element a bf16 value)."""
    hidden, weight, targets = _inputs(64, 32, 97, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    (grad,) = torch.autograd.grad(loss, (weight,))
    (ref_grad,) = torch.autograd.grad(ref, (weight,))
    assert grad.dtype == torch.float32
    assert (grad != grad.bfloat16().float()).float().mean() > 0.5
    assert torch.equal(ref_grad, ref_grad.bfloat16().float())  # autocast's F.linear: a bf16 gradient
    torch.testing.assert_close(grad, ref_grad, rtol=5e-2, atol=2e-3)


def test_tied_weight_receives_both_gradients() -> None:
    emb = torch.nn.Embedding(13, 8).double()
    tokens = torch.randint(0, 13, (20,))
    targets = torch.randint(0, 13, (20,))
    loss = linear_cross_entropy(torch.tanh(emb(tokens)), emb.weight, targets, chunk_rows=6)
    loss.backward()
    got = emb.weight.grad.clone()
    emb.weight.grad = None
    F.cross_entropy(torch.tanh(emb(tokens)) @ emb.weight.T, targets).backward()
    torch.testing.assert_close(got, emb.weight.grad)


def test_bad_shapes_are_named() -> None:
    hidden, weight, targets = _inputs(10, 8, 5)
    with pytest.raises(ValueError, match="hidden has 10 rows but targets has 9"):
        linear_cross_entropy(hidden, weight, targets[:9])
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 8\), got \(5, 7\)"):
        linear_cross_entropy(hidden, weight[:, :7], targets)


@pytest.mark.gpu
def test_cuda_bf16_compiled_chunks_match_cross_entropy() -> None:
    """On CUDA each chunk's softmax gradient is one compiled pass; a shorter last chunk included."""
    hidden = torch.randn(4096 + 37, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(5000, 256, device="cuda") / 16).requires_grad_()
    targets = torch.randint(0, 5000, (4096 + 37,), device="cuda")
    targets[::5] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=1024)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert (got - want).norm() / want.norm() < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_weight_gradient_accumulates_in_float32(dtype: torch.dtype) -> None:
    """The half-precision product added into the float32 gradient equals the product taken in
    float32 and added, to the product's own rounding (no half-precision sum in between)."""
    a = torch.randn(300, 1000, device="cuda", dtype=dtype)
    b = torch.randn(1000, 200, device="cuda", dtype=dtype)
    out = torch.randn(300, 200, device="cuda")
    want = out + a.float() @ b.float()
    _accumulate(out, a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-3)
