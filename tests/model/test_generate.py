import pytest
import torch

from mgqa import Decoder, MGQATransformer
from mgqa.model.sampling import filter_logits, sample_next


def model_for(pos_emb: str, kv_heads: int = 2, max_seq_len: int = 24) -> MGQATransformer:
    torch.manual_seed(1)
    model = MGQATransformer(
        num_tokens=40,
        max_seq_len=max_seq_len,
        attn_layers=Decoder(dim=32, depth=2, heads=4, attn_kv_heads=kv_heads, pos_emb=pos_emb),
    )
    return model.eval()


@pytest.mark.parametrize("pos_emb", ["rotary", "absolute"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_cached_and_uncached_greedy_decoding_agree(pos_emb, kv_heads):
    model = model_for(pos_emb, kv_heads)
    prompt = torch.randint(0, 40, (3, 5))
    # 30 new tokens run past max_seq_len=24, so the sliding window is exercised too.
    cached = model.generate(prompt, 30, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 30)
    assert torch.equal(cached, uncached)


def test_cache_step_logits_match_full_forward():
    model = model_for("rotary")
    tokens = torch.randint(0, 40, (2, 10))
    full = model(tokens)
    cache = model.new_cache(2)
    first = model(tokens[:, :6], cache=cache)
    rest = [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.length == 10


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = model_for("rotary")
    prompt = torch.randint(0, 40, (2, 4))
    a = model.generate(prompt, 12, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 12, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 40


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept_k = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept_k.tolist() == [[True, True, False, False, False]]
    probs = torch.softmax(logits, -1)[0]
    kept_p = torch.isfinite(filter_logits(logits, top_p=float(probs[0] + probs[1]) - 1e-3))
    assert kept_p.tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).sum() == 1  # the best token always stays
    # top_k=1 sampling is greedy whatever the temperature
    assert sample_next(logits.repeat(4, 1), temperature=5.0, top_k=1).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_sampling_arguments_are_refused(kwargs, message):
    model = model_for("rotary")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3, **kwargs)


def test_eos_stops_a_sequence():
    model = model_for("rotary")
    prompt = torch.randint(0, 40, (1, 3))
    greedy = model.generate(prompt, 10, temperature=0.0)
    eos = int(greedy[0, 2])
    out = model.generate(prompt, 10, temperature=0.0, eos_token=eos)
    first = int((out[0] == eos).nonzero()[0])
    assert (out[0, first:] == eos).all() and out.shape == (1, 10)
