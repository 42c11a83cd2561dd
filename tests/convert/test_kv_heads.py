"""MHA -> GQA conversion of a model's K/V heads (the GQA paper's section 2.1)."""

import pytest
import torch

from mgqa import Decoder, MGQATransformer
from mgqa.convert.kv_heads import convert_kv_heads
from mgqa.model import ConfigError

HEADS, HEAD_DIM = 8, 8


def mha(kv_heads: int = HEADS, bias: bool = False) -> MGQATransformer:
    torch.manual_seed(0)
    layers = Decoder(dim=HEADS * HEAD_DIM, depth=2, heads=HEADS, attn_kv_heads=kv_heads, pos_emb="rotary", norm="rmsnorm", ff="swiglu", bias=bias)
    return MGQATransformer(num_tokens=50, max_seq_len=32, attn_layers=layers).eval()


def converted(model: MGQATransformer, kv_heads: int, method: str) -> MGQATransformer:
    state, cfg = convert_kv_heads(model.state_dict(), model.config, kv_heads, method, torch.Generator().manual_seed(1))
    out = MGQATransformer.from_config(cfg).eval()
    out.load_state_dict(state)
    return out


def tie_groups(model: MGQATransformer, kv_heads: int) -> None:
    """Make the source's K/V heads identical within each group of the target's grouping."""
    width = HEADS * HEAD_DIM
    with torch.no_grad():
        for block in model.attn_layers.blocks:
            for part in (1, 2):  # k, then v rows of the fused projection
                rows = block.attn.qkv.weight[part * width : (part + 1) * width].view(kv_heads, HEADS // kv_heads, HEAD_DIM, -1)
                rows.copy_(rows[:, :1].expand_as(rows).clone())
                if block.attn.qkv.bias is not None:
                    b = block.attn.qkv.bias[part * width : (part + 1) * width].view(kv_heads, HEADS // kv_heads, HEAD_DIM)
                    b.copy_(b[:, :1].expand_as(b).clone())


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_mean_of_identical_grouped_heads_keeps_the_logits(kv_heads, bias):
    model = mha(bias=bias)
    tie_groups(model, kv_heads)
    tokens = torch.randint(0, 50, (2, 20))
    gqa = converted(model, kv_heads, "mean")
    assert gqa.config.kv_heads == kv_heads
    assert gqa.attn_layers.blocks[0].attn.qkv.weight.shape[0] == (HEADS + 2 * kv_heads) * HEAD_DIM
    torch.testing.assert_close(gqa(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted(model, kv_heads, "first")(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_methods_differ_on_distinct_heads_and_mean_is_the_group_mean():
    model = mha()
    tokens = torch.randint(0, 50, (1, 16))
    mean, first, rand = (converted(model, 2, m) for m in ("mean", "first", "random"))
    width = HEADS * HEAD_DIM
    src_k = model.attn_layers.blocks[0].attn.qkv.weight[width : 2 * width].view(2, 4, HEAD_DIM, -1)
    new_k = mean.attn_layers.blocks[0].attn.qkv.weight[width : width + 2 * HEAD_DIM].view(2, HEAD_DIM, -1)
    torch.testing.assert_close(new_k, src_k.mean(dim=1))
    torch.testing.assert_close(first.attn_layers.blocks[0].attn.qkv.weight[width : width + HEAD_DIM], src_k[0, 0])
    # Queries, feed-forwards and embeddings are copied; only K/V change.
    for m in (mean, first, rand):
        assert torch.equal(m.attn_layers.blocks[1].attn.qkv.weight[:width], model.attn_layers.blocks[1].attn.qkv.weight[:width])
        assert torch.equal(m.token_emb.weight, model.token_emb.weight)
    outs = [m(tokens) for m in (model, mean, first, rand)]
    assert all(not torch.allclose(outs[i], outs[j], atol=1e-4) for i in range(4) for j in range(i + 1, 4))


def test_same_count_copies_and_more_heads_compute_the_same_function():
    model = mha(kv_heads=2)
    tokens = torch.randint(0, 50, (2, 12))
    same = converted(model, 2, "random")  # the method does not matter: a plain copy
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))
    torch.testing.assert_close(converted(model, 8, "mean")(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_bad_targets_are_refused_with_the_valid_values():
    model = mha(kv_heads=4)
    with pytest.raises(ConfigError, match=r"init.kv_heads=3 .*valid values: \[1, 2, 4, 8\]"):
        convert_kv_heads(model.state_dict(), model.config, 3)
    with pytest.raises(ConfigError, match="init.method='median' is unknown"):
        convert_kv_heads(model.state_dict(), model.config, 2, "median")
