"""Batched generation over a static KV cache: prompts of different lengths, per-sequence positions,
the Triton decode kernel in the model (interpreter on CPU), and the stream API's checks."""


import pytest
import torch
import torch._dynamo

from mgqa import Decoder, MGQATransformer
from mgqa.model.sampling import sample_next
from mgqa.model.static_cache import StaticKVCache


def model_for(pos_emb="rotary", kv_heads=2, max_seq_len=24, dim=32, heads=4, backend="auto"):
    torch.manual_seed(1)
    model = MGQATransformer(
        num_tokens=40,
        max_seq_len=max_seq_len,
        attn_layers=Decoder(dim=dim, depth=2, heads=heads, attn_kv_heads=kv_heads, pos_emb=pos_emb,
                            attn_backend=backend),
    )
    return model.eval()


@pytest.mark.parametrize("pos_emb", ["rotary", "absolute"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_generates_what_each_prompt_generates_alone(pos_emb, use_cache):
    model = model_for(pos_emb)
    prompts = [torch.randint(0, 40, (n,)) for n in (3, 9, 1, 6)]
    # 20 new tokens take the 9-token prompt past max_seq_len=24: its window slides, the others' not yet.
    batched = model.generate(prompts, 20, temperature=0.0, use_cache=use_cache)
    assert batched.shape == (4, 20)
    for i, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 20, temperature=0.0, use_cache=False)
        assert torch.equal(batched[i], alone[0]), f"sequence {i}"


def test_static_cache_steps_match_the_full_forward_at_each_sequence_position():
    model = model_for()
    tokens = torch.randint(0, 40, (2, 12))
    full = model(tokens)  # (2, 12, V)
    cache = model.new_static_cache(2, capacity=16)
    keys = [k.data_ptr() for k in cache.keys]
    cache.prefill = True
    model.hidden_states(tokens[:, :7], cache=cache)
    cache.prefill = False
    cache.lengths.copy_(torch.tensor([4, 7]))  # sequence 0 continues after 4 tokens, sequence 1 after 7
    for step in range(5):
        fed = torch.stack([tokens[0, 4 + step], tokens[1, 7 + step]])[:, None]  # (2, 1)
        logits = model(fed, cache=cache)[:, -1]
        torch.testing.assert_close(logits[0], full[0, 4 + step], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[1], full[1, 7 + step], rtol=1e-4, atol=1e-5)
    assert cache.lengths.tolist() == [9, 12]
    assert [k.data_ptr() for k in cache.keys] == keys  # allocated once


def test_triton_decode_kernel_in_the_model_agrees_with_the_uncached_path():
    # head_dim 32 and backend "triton": the decode kernel and the training kernels run in the interpreter.
    model = model_for(dim=128, heads=4, kv_heads=2, max_seq_len=32, backend="triton")
    prompts = [torch.randint(0, 40, (n,)) for n in (5, 2)]
    cached = model.generate(prompts, 6, temperature=0.0, use_cache=True)
    uncached = model.generate(prompts, 6, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generate_stream_yields_each_step_and_checks_arguments_before_the_first():
    model = model_for()
    prompt = torch.randint(0, 40, (2, 3))
    steps = list(model.generate_stream(prompt, 5, temperature=0.0))
    assert len(steps) == 5 and all(s.shape == (2,) and s.dtype == torch.long for s in steps)
    assert torch.equal(torch.stack(steps, 1), model.generate(prompt, 5, temperature=0.0))
    for kwargs, message in [
        ({"top_k": 0}, "top_k must be >= 1, got 0"),
        ({"cuda_graph": True}, "cuda_graph=True needs the model on a CUDA device, it is on cpu"),
        ({"cuda_graph": True, "use_cache": False}, "cuda_graph=True needs"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.generate_stream(torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)  # raised before iterating


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], r"sequence 1 is empty"),
        (torch.zeros(1, 2, 3, dtype=torch.long), r"prompt must be \(batch, seq_len\)"),
        (torch.zeros(1, 2), "prompt tokens must be integers, got torch.float32"),
        ([], "non-empty list"),
        ([torch.zeros(2, 2, dtype=torch.long)], r"prompt\[0\] must be a 1-d token sequence"),
    ],
)
def test_bad_prompts_are_refused(prompt, message):
    with pytest.raises(ValueError, match=message):
        model_for().generate(prompt, 3)


def test_bad_max_new_tokens_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        model_for().generate(torch.zeros(1, 2, dtype=torch.long), -1)
    assert model_for().generate(torch.zeros(3, 2, dtype=torch.long), 0).shape == (3, 0)


def test_exponential_race_samples_the_softmax_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(40000, 1)
    tokens = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).double() / len(tokens)
    torch.testing.assert_close(freq, torch.softmax(logits[0].double(), 0), rtol=0, atol=0.01)
    again = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


def test_static_cache_refuses_a_capacity_past_max_seq_len():
    with pytest.raises(ValueError, match="cache capacity 30 is longer than model.max_seq_len=24"):
        model_for().new_static_cache(1, 30)
    assert isinstance(model_for().new_static_cache(2), StaticKVCache)


def test_compiled_decode_step_traces_whole_and_keeps_greedy_tokens(eager_compile):
    model = model_for()
    prompts = [torch.randint(0, 40, (n,)) for n in (5, 3)]
    compiled = model.generate(prompts, 8, temperature=0.0, compile_step=True)
    assert torch.equal(compiled, model.generate(prompts, 8, temperature=0.0, use_cache=False))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    # Two streams of the same shapes at once: the second must not decode through the first's kept cache.
    first = model.generate_stream(prompts, 8, temperature=0.0, compile_step=True)
    second = model.generate_stream(prompts, 8, temperature=0.0, compile_step=True)
    interleaved = [(a, b) for a, b in zip(first, second)]
    assert torch.equal(torch.stack([a for a, _ in interleaved], 1), compiled)
    assert torch.equal(torch.stack([b for _, b in interleaved], 1), compiled)
    with pytest.raises(ValueError, match="compile_step=True compiles the cached decode step"):
        model.generate(prompts, 2, use_cache=False, compile_step=True)


@pytest.mark.parametrize("pos_emb", ["rotary", "absolute"])
def test_a_kept_decode_step_prefills_the_next_call_from_position_zero(eager_compile, pos_emb):
    # The kept step's cache still holds the last call's lengths; the next prompt must not continue from them.
    model = model_for(pos_emb=pos_emb, dim=64)
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 4)]
    expected = model.generate(prompts, 10, temperature=0.0, use_cache=False)
    for _ in range(3):
        assert torch.equal(model.generate(prompts, 10, temperature=0.0, compile_step=True), expected)
    assert "_decode_step" in model.__dict__  # the later calls reused the kept step
