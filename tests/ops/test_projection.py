"""``mgqa.ops.linear``: F.linear, with the weight gradient taken in float32 under half-precision autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mgqa.model import MGQATransformer, ModelConfig
from mgqa.ops import linear
from mgqa.ops.projection import widened_grad_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(bias: bool, shape=(3, 5, 16), out=24):
    torch.manual_seed(0)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    weight = (torch.randn(out, shape[-1], device=DEVICE) / shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(out, device=DEVICE, requires_grad=True) if bias else None
    return x, weight, b


def _grads(fn, x, weight, b, grad_out):
    y = fn(x, weight, b)
    wanted = [t for t in (x, weight, b) if t is not None]
    return (y, *torch.autograd.grad(y, wanted, grad_out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_under_autocast_only_the_weight_gradient_changes_and_it_is_closer_to_float64(dtype, bias):
    x, weight, b = _inputs(bias)
    grad_out = torch.randn(3, 5, 24, device=DEVICE, dtype=dtype)
    with torch.autocast(DEVICE, dtype=dtype):
        assert widened_grad_dtype(x, weight) == dtype
        ours = _grads(linear, x, weight, b, grad_out)
        theirs = _grads(F.linear, x, weight, b, grad_out)
    y, gx, gw = ours[:3]
    assert y.dtype == dtype and gx.dtype == torch.float32 and gw.dtype == torch.float32
    assert torch.equal(y, theirs[0])  # the same half-precision product
    assert torch.equal(gx, theirs[1])  # the same input gradient, converted to x's float32
    if bias:
        assert ours[3].dtype == torch.float32
        torch.testing.assert_close(ours[3], theirs[3], rtol=1e-2, atol=1e-2)
    # The weight gradient of the half-precision operands, exactly: sum over tokens of grad_out x x_half.
    x_half = x.detach().to(dtype).double().reshape(-1, 16)
    exact = grad_out.double().reshape(-1, 24).t() @ x_half
    err_ours, err_theirs = (gw - exact).abs().max().item(), (theirs[2].double() - exact).abs().max().item()
    assert err_ours < 1e-5 and err_ours < err_theirs, (err_ours, err_theirs)


@pytest.mark.parametrize("case", ["no_autocast", "half_weight", "no_grad_weight"])
def test_elsewhere_it_is_f_linear(case):
    x, weight, _ = _inputs(False)
    if case == "half_weight":
        weight = weight.detach().to(torch.bfloat16).requires_grad_()
    if case == "no_grad_weight":
        weight = weight.detach()
    context = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=case != "no_autocast")
    with context:
        assert widened_grad_dtype(x, weight) is None
        y = linear(x, weight)
        assert torch.equal(y, F.linear(x, weight))
    assert y.grad_fn.name() != "_WideGradLinearBackward"


def test_only_the_inputs_that_need_a_gradient_get_one():
    x, weight, b = _inputs(True)
    x.requires_grad_(False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = linear(x, weight, b)
    gw, gb = torch.autograd.grad(y.float().sum(), (weight, b))
    assert gw.shape == weight.shape and gb.shape == b.shape


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_matches_eager(backend):
    """Traced without a graph break. AOTAutograd alone gives the same bits; Inductor on the CPU fuses
    the float32 copy of the half-precision input with its rounding and skips the rounding (it does
    not emulate precision casts), so there the weight gradient may differ at half precision."""
    x, weight, b = _inputs(True)
    grad_out = torch.randn(3, 5, 24, device=DEVICE, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True, backend=backend)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager = _grads(linear, x, weight, b, grad_out)
        traced = _grads(compiled, x, weight, b, grad_out)
    exact = backend == "aot_eager" or DEVICE == "cuda"
    for a, c in zip(eager, traced):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c, rtol=0 if exact else 2e-2, atol=0 if exact else 2e-2)


def test_the_model_projections_take_float32_weight_gradients():
    cfg = ModelConfig(dim=32, depth=1, heads=4, kv_heads=2, num_tokens=50, max_seq_len=16, pos_emb="rotary",
                      norm="rmsnorm", ff="swiglu", bias=False)
    model = MGQATransformer.from_config(cfg)
    block = model.attn_layers.blocks[0]
    layers = (block.attn.qkv, block.attn.out, block.ff.w_in, block.ff.w_out)
    seen = []
    original = F.linear

    def spy(x, weight, bias=None):
        seen.append(weight)
        return original(x, weight, bias)

    tokens = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "linear", spy)
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
    # Each projection's forward multiplied a bf16 copy of its weight: none went through F.linear as
    # the float32 parameter, which autocast would have cast (and whose gradient it would have rounded).
    assert not any(any(w is layer.weight for w in seen) for layer in layers)
    for layer in layers:
        assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
        assert (layer.weight.grad != layer.weight.grad.bfloat16().float()).any()  # not a bf16 gradient


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_widened_product_gives_the_weight_gradient_eager_and_compiled():
    """At a projection's size (4096 tokens, 768 -> 2304): the float32 weight gradient of the bf16
    operands to float32 accuracy, and Inductor's graph (the product as an extern kernel) bit-identical."""
    from mgqa.ops.projection import _MM_OUT_DTYPE

    assert _MM_OUT_DTYPE, "this torch has no aten::mm.dtype: the CUDA path falls back to F.linear"
    torch.manual_seed(0)
    x = torch.randn(2, 2048, 768, device="cuda", requires_grad=True)
    weight = (torch.randn(2304, 768, device="cuda") / 768**0.5).requires_grad_()
    grad_out = torch.randn(2, 2048, 2304, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(linear, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _grads(linear, x, weight, None, grad_out)
        traced = _grads(compiled, x, weight, None, grad_out)
        plain = _grads(F.linear, x, weight, None, grad_out)
    exact = grad_out.double().reshape(-1, 2304).t() @ x.detach().to(torch.bfloat16).double().reshape(-1, 768)
    err = (eager[2].double() - exact).norm() / exact.norm()
    err_plain = (plain[2].double() - exact).norm() / exact.norm()
    assert err < 1e-5 < err_plain, (err.item(), err_plain.item())
    for a, c in zip(eager, traced):
        assert torch.equal(a, c)
