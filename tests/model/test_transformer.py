import pytest
import torch

from mgqa import ConfigError, Decoder, MGQATransformer, ModelConfig
from mgqa.model import GroupedQueryAttention


def test_seed_example_shape_and_finite():
    from mgqa.transformer import Decoder as SeedDecoder
    from mgqa.transformer import MGQATransformer as SeedTransformer

    model = SeedTransformer(
        num_tokens=20000, max_seq_len=1024, attn_layers=SeedDecoder(dim=512, depth=12, heads=8, attn_kv_heads=2)
    )
    with torch.no_grad():
        logits = model(torch.randint(0, 20000, (1, 1024)))
    assert logits.shape == (1, 1024, 20000)
    assert torch.isfinite(logits).all()
    assert SeedTransformer is MGQATransformer and SeedDecoder is Decoder


def tiny(**options) -> MGQATransformer:
    options = {"dim": 32, "depth": 2, "heads": 4, "attn_kv_heads": 2, **options}
    return MGQATransformer(num_tokens=50, max_seq_len=16, attn_layers=Decoder(**options))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_kv_projection_width_follows_kv_heads(kv_heads):
    model = tiny(attn_kv_heads=kv_heads)
    attn = model.attn_layers.blocks[0].attn
    head_dim = 32 // 4
    assert attn.qkv.out_features == (4 + 2 * kv_heads) * head_dim
    assert model.kv_cache_bytes_per_token(torch.float32) == 2 * 2 * kv_heads * head_dim * 4


def test_fewer_kv_heads_means_fewer_parameters():
    assert tiny(attn_kv_heads=1).num_parameters() < tiny(attn_kv_heads=2).num_parameters() < tiny(attn_kv_heads=4).num_parameters()


def test_attention_module_matches_mha_with_copied_kv_heads():
    """GQA == MHA whose KV heads are each copied to their group of query heads."""
    torch.manual_seed(0)
    dim, heads, kv_heads, hd = 32, 4, 2, 8
    gqa = GroupedQueryAttention(dim, heads, kv_heads, hd, bias=False, dropout=0.0, backend="reference", layer_index=0)
    mha = GroupedQueryAttention(dim, heads, heads, hd, bias=False, dropout=0.0, backend="reference", layer_index=0)
    wq, wk, wv = gqa.qkv.weight.split((heads * hd, kv_heads * hd, kv_heads * hd))
    group = heads // kv_heads
    # Query head h reads KV head h // group: copy each KV head's rows to its group.
    wk_full = wk.view(kv_heads, hd, dim).repeat_interleave(group, dim=0).reshape(heads * hd, dim)
    wv_full = wv.view(kv_heads, hd, dim).repeat_interleave(group, dim=0).reshape(heads * hd, dim)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat((wq, wk_full, wv_full)))
        mha.out.weight.copy_(gqa.out.weight)
    x = torch.randn(2, 7, dim)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)
    # Pairing query head 0 with KV head 1 instead must change the output (the mapping matters).
    with torch.no_grad():
        wk_swapped = wk.view(kv_heads, hd, dim).flip(0).repeat_interleave(group, dim=0).reshape(heads * hd, dim)
        mha.qkv.weight.copy_(torch.cat((wq, wk_swapped, wv_full)))
    assert not torch.allclose(gqa(x), mha(x), atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"pos_emb": "rotary"},
        {"pos_emb": "absolute"},
        {"norm": "rmsnorm"},
        {"norm": "layernorm"},
        {"ff": "swiglu"},
        {"ff": "gelu"},
        {"bias": False},
        {"bias": True},
        {"tie_embeddings": True},
        {"dropout": 0.1},
        {"head_dim": 12},
    ],
)
def test_every_option_builds_trains_and_is_causal(options):
    torch.manual_seed(0)
    model = tiny(**options)
    tokens = torch.randint(0, 50, (2, 12))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    with torch.no_grad():
        # Causal: changing tokens 8.. leaves the logits of positions 0..7 unchanged.
        torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])


def test_option_effects_are_visible():
    assert tiny(pos_emb="absolute").pos_emb is not None and tiny(pos_emb="rotary").pos_emb is None
    assert tiny(pos_emb="rotary").rotary is not None
    assert type(tiny(norm="rmsnorm").attn_layers.norm).__name__ == "RMSNorm"
    assert isinstance(tiny(norm="layernorm").attn_layers.norm, torch.nn.LayerNorm)
    assert tiny(bias=True).attn_layers.blocks[0].attn.qkv.bias is not None
    assert tiny(bias=False).attn_layers.blocks[0].ff.w_out.bias is None
    swiglu = tiny(ff="swiglu").attn_layers.blocks[0].ff.w_in
    gelu = tiny(ff="gelu").attn_layers.blocks[0].ff.w_in
    assert swiglu.out_features % 2 == 0 and swiglu.out_features != gelu.out_features
    tied = tiny(tie_embeddings=True)
    assert tied.to_logits.weight.data_ptr() == tied.token_emb.weight.data_ptr()
    untied = tiny()
    assert untied.to_logits.weight.data_ptr() != untied.token_emb.weight.data_ptr()


def test_dropout_is_random_in_training_and_off_in_eval():
    model = tiny(dropout=0.5)
    tokens = torch.randint(0, 50, (2, 10))
    model.train()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_rotary_model_is_position_relative_absolute_is_not():
    """With rotary positions, a token's attention scores depend on relative offsets only."""
    torch.manual_seed(0)
    from mgqa.model.layers import RotaryEmbedding, apply_rotary

    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        cq, sq = rope(torch.tensor([i]))
        ck, sk = rope(torch.tensor([j]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_llama_preset_matches_its_description():
    from tests.conftest import compose

    cfg = ModelConfig.from_dict({**compose("model=llama").model, "num_tokens": 257})
    assert (cfg.pos_emb, cfg.norm, cfg.ff, cfg.bias) == ("rotary", "rmsnorm", "swiglu", False)
    seed = ModelConfig.from_dict({**compose("model=seed").model, "num_tokens": 257})
    assert (seed.pos_emb, seed.norm, seed.ff, seed.bias) == ("absolute", "layernorm", "gelu", True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"heads": 8, "attn_kv_heads": 3}, "kv_heads (3) must divide model.heads (8)"),
        ({"dim": 30, "heads": 4}, "model.dim (30) must be divisible by model.heads (4)"),
        ({"pos_emb": "alibi"}, "model.pos_emb='alibi'"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm'"),
        ({"ff": "relu"}, "model.ff='relu'"),
        ({"dropout": 1.5}, "model.dropout must be in [0, 1)"),
        ({"depth": 0}, "model.depth must be a positive integer, got 0"),
        ({"attn_backend": "cuda"}, "model.attn_backend='cuda'"),
        ({"colour": "red"}, "unknown model option(s) ['colour']"),
    ],
)
def test_invalid_model_options_name_the_value(kwargs, message):
    options = {"dim": 32, "depth": 2, "heads": 4, **kwargs}
    with pytest.raises(ConfigError) as err:
        Decoder(**options)
    assert message in str(err.value)


def test_too_long_input_and_bad_shapes_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="longer than model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be \(batch, seq_len\)"):
        model(torch.zeros(17, dtype=torch.long))


def test_loss_matches_cross_entropy_of_logits() -> None:
    import torch.nn.functional as F

    model = MGQATransformer.from_config(
        ModelConfig(dim=32, depth=2, heads=4, kv_heads=2, num_tokens=50, max_seq_len=16, tie_embeddings=True)
    ).double()
    tokens, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    loss = model.loss(tokens, targets)
    ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    cfg = dict(dim=32, depth=2, heads=4, kv_heads=2, num_tokens=50, max_seq_len=16, dropout=0.1)
    plain = MGQATransformer.from_config(ModelConfig(**cfg)).double()
    ckpt = MGQATransformer.from_config(ModelConfig(**cfg, activation_checkpointing=True)).double()
    ckpt.load_state_dict(plain.state_dict())
    tokens, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    grads = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        torch.manual_seed(0)  # the same dropout masks; checkpointing replays the RNG in recomputation
        model.loss(tokens, targets).backward()
        grads[name] = [p.grad for p in model.parameters()]
    for got, want in zip(grads["ckpt"], grads["plain"]):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # inference and cached decoding never checkpoint
        torch.testing.assert_close(ckpt.eval()(tokens), plain.eval()(tokens))


def test_training_flops_per_token_counts_matrices_and_attention() -> None:
    model = MGQATransformer.from_config(ModelConfig(dim=64, depth=2, heads=4, kv_heads=2, num_tokens=100, max_seq_len=32))
    expected = 6 * model.num_parameters(non_embedding=True) + 6 * 2 * 4 * 16 * 32
    assert model.training_flops_per_token(32) == expected
