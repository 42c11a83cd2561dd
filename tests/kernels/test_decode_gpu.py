"""The decode kernel and graph-captured generation on a CUDA GPU: bf16/fp16 at the benchmark's
shapes, a captured launch replayed at new lengths, the ``auto`` routing, and greedy parity of the
captured decode loop. The CPU tests (interpreter) are tests/kernels/test_decode_kernel.py and
tests/model/test_fast_generate.py."""

from __future__ import annotations

import logging

import pytest
import torch

from mgqa import Decoder, MGQATransformer, ops
from mgqa.kernels import decode as kernels
from mgqa.ops.reference import reference_decode_attention

pytestmark = pytest.mark.gpu
K_SLACK = 4.0
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel_err(x, ref) -> float:
    assert torch.isfinite(x).all()
    return ((x.double() - ref).norm() / ref.norm()).item()


def inputs(batch, heads, kv_heads, n_q, head_dim, capacity, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).to(dtype)  # noqa: E731
    return make(batch, heads, n_q, head_dim), make(batch, kv_heads, capacity, head_dim), \
        make(batch, kv_heads, capacity, head_dim)


def check(q, k, v, lengths, causal=True, **kwargs):
    out = kernels.decode_attention(q, k, v, lengths, causal=causal, **kwargs)
    oracle = reference_decode_attention(q, k, v, lengths, causal=causal, upcast=torch.float32).double()
    same = reference_decode_attention(q, k, v, lengths, causal=causal, upcast=q.dtype).double()
    assert rel_err(out, oracle) <= K_SLACK * rel_err(same, oracle) + ATOL[q.dtype]


@pytest.mark.parametrize("batch, heads, kv_heads, head_dim, context", [
    (32, 32, 8, 128, 8192), (8, 32, 4, 128, 32768), (1, 32, 8, 128, 131072), (64, 32, 1, 128, 4096),
    (16, 32, 8, 64, 8192), (4, 32, 32, 64, 2048),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_benchmark_shapes_match_reference(batch, heads, kv_heads, head_dim, context, dtype):
    q, k, v = inputs(batch, heads, kv_heads, 1, head_dim, context, dtype)
    check(q, k, v, torch.full((batch,), context, dtype=torch.int32, device="cuda"))


@pytest.mark.parametrize("n_q", [1, 2, 3, 8])
@pytest.mark.parametrize("kv_heads", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ragged_lengths_and_several_queries(n_q, kv_heads, dtype):
    q, k, v = inputs(6, 16, kv_heads, n_q, 128, 5000, dtype, seed=n_q)
    lengths = torch.tensor([5000, 8, 1, 4097, 64, 2500], device="cuda").clamp(min=n_q)
    check(q, k, v, lengths)
    check(q, k, v, lengths, causal=False)
    check(q, k, v, lengths, splits=1)


def test_a_captured_launch_replays_at_new_lengths():
    q, k, v = inputs(4, 32, 8, 1, 128, 4096, torch.bfloat16)
    lengths = torch.tensor([4096, 100, 1, 3000], dtype=torch.int32, device="cuda")
    kernels.decode_attention(q, k, v, lengths)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.decode_attention(q, k, v, lengths)
    for new in ([17, 4096, 2048, 5], [1, 1, 1, 1]):
        lengths.copy_(torch.tensor(new))
        graph.replay()
        torch.cuda.synchronize()
        expected = reference_decode_attention(q, k, v, lengths).double()
        assert rel_err(out, expected) < 2e-2


def test_auto_routes_a_decode_step_to_the_decode_kernel(caplog):
    q, k, v = inputs(2, 32, 8, 1, 128, 1000, torch.bfloat16)
    ops._announced.clear()
    with caplog.at_level(logging.INFO, logger="mgqa.ops"):
        out = ops.attention(q, k, v, causal=True)
        lengths = torch.full((2,), 1000, device="cuda")
        out2 = ops.decode_attention(q, k, v, lengths)
    assert "triton decode" in caplog.text
    expected = reference_decode_attention(q, k, v, lengths).double()
    assert rel_err(out, expected) < 2e-2 and torch.equal(out, out2)


def model_for(dtype, kv_heads=2, max_seq_len=128):
    torch.manual_seed(0)
    layers = Decoder(dim=256, depth=2, heads=8, attn_kv_heads=kv_heads, pos_emb="rotary", norm="rmsnorm", ff="swiglu",
                     bias=False)
    return MGQATransformer(num_tokens=500, max_seq_len=max_seq_len, attn_layers=layers).cuda().to(dtype).eval()


@pytest.mark.parametrize("kv_heads", [1, 2, 8])
def test_captured_greedy_decoding_equals_the_uncached_path(kv_heads):
    model = model_for(torch.float32, kv_heads)
    prompts = [torch.randint(0, 500, (n,), device="cuda") for n in (17, 3, 60)]
    captured = model.generate(prompts, 90, temperature=0.0)  # the 60-token prompt slides past max_seq_len
    assert model.__dict__["_decode_step"][1].graph is not None
    assert torch.equal(captured, model.generate(prompts, 90, temperature=0.0, use_cache=False))


def test_captured_and_eager_steps_run_the_same_kernels_in_bf16():
    model = model_for(torch.bfloat16)
    prompt = torch.randint(0, 500, (4, 33), device="cuda")
    captured = model.generate(prompt, 40, temperature=0.0)
    held = model.__dict__["_decode_step"][1]
    assert torch.equal(captured, model.generate(prompt, 40, temperature=0.0))  # replays the held graph
    assert model.__dict__["_decode_step"][1] is held
    assert torch.equal(captured, model.generate(prompt, 40, temperature=0.0, cuda_graph=False))
    model.release_decode_step()
    assert "_decode_step" not in model.__dict__


def test_sampling_inside_the_graph_is_reproducible_and_top_k_1_is_greedy():
    model = model_for(torch.bfloat16)
    prompt = torch.randint(0, 500, (3, 10), device="cuda")
    draw = lambda seed: model.generate(prompt, 30, temperature=0.8, top_p=0.9,  # noqa: E731
                                       generator=torch.Generator(device="cuda").manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    # top_k=1 keeps every token tied for the top logit, and bf16 logits tie often enough that the
    # draw then differs from argmax's first index: compare in float32.
    model = model_for(torch.float32)
    greedy = model.generate(prompt, 30, temperature=0.0)
    assert torch.equal(model.generate(prompt, 30, temperature=1.5, top_k=1), greedy)


def test_compiled_captured_step_keeps_greedy_tokens():
    model = model_for(torch.float32)
    prompts = [torch.randint(0, 500, (n,), device="cuda") for n in (9, 30)]
    compiled = model.generate(prompts, 24, temperature=0.0, compile_step=True)
    assert torch.equal(compiled, model.generate(prompts, 24, temperature=0.0, use_cache=False))
