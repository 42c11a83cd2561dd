"""Hugging Face interop: our model exported to LlamaForCausalLM and HF Llama/Mistral directories imported,
each checked for logits parity and greedy generation token for token."""

import json

import pytest
import torch

from mgqa import Decoder, MGQATransformer
from mgqa.convert.hf_export import export_hf
from mgqa.data import build_tokenizer
from mgqa.model import ConfigError
from tests.conftest import ROOT

transformers = pytest.importorskip("transformers")

LLAMA = dict(pos_emb="rotary", norm="rmsnorm", ff="swiglu", bias=False)


def ours(kv_heads: int = 2, tie: bool = False, **options) -> MGQATransformer:
    torch.manual_seed(0)
    layers = Decoder(dim=64, depth=2, heads=4, attn_kv_heads=kv_heads, **{**LLAMA, **options})
    model = MGQATransformer(num_tokens=257, max_seq_len=64, attn_layers=layers, tie_embeddings=tie)
    with torch.no_grad():  # norms away from 1, so a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[:, prompt.shape[1] :]


@pytest.mark.parametrize("kv_heads, tie", [(1, False), (2, True), (4, False)])
def test_export_matches_llama_for_causal_lm(tmp_path, kv_heads, tie):
    model = ours(kv_heads, tie)
    export_hf(model, build_tokenizer("byte"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_key_value_heads"] == kv_heads and config["model_type"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4
    prompt = tokens[:1, :8]
    assert torch.equal(hf_greedy(hf, prompt, 16), model.generate(prompt, 16, temperature=0.0))


@pytest.mark.parametrize("spec", ["byte", "data/tokenizers/shakespeare-bpe-2k.json"])
def test_exported_tokenizer_loads_with_autotokenizer_and_gives_our_ids(tmp_path, spec):
    tokenizer = build_tokenizer(spec if spec == "byte" else str(ROOT / spec))
    layers = Decoder(dim=32, depth=1, heads=2, **LLAMA)
    export_hf(MGQATransformer(num_tokens=tokenizer.vocab_size, max_seq_len=16, attn_layers=layers), tokenizer, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "ROMEO. But soft, what light — through yonder window breaks?\n"
    assert auto(text)["input_ids"] == tokenizer.encode(text)
    assert auto.decode(tokenizer.encode(text)) == text
    assert auto.eos_token_id == tokenizer.eot_id


@pytest.mark.parametrize(
    "options, blocker",
    [({"pos_emb": "absolute"}, "model.pos_emb='absolute'"), ({"norm": "layernorm"}, "model.norm='layernorm'"), ({"bias": True}, "model.bias=True")],
)
def test_only_the_llama_architecture_exports(tmp_path, options, blocker):
    with pytest.raises(ConfigError, match=f"only the Llama architecture exports.*{blocker}"):
        export_hf(ours(**options), build_tokenizer("byte"), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def hf_model(kind: str, tie: bool = False):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, rms_norm_eps=1e-5)  # fmt: skip
    if kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("kind, tie, shard", [("llama", False, False), ("llama", True, True), ("mistral", False, True)])
def test_import_matches_the_hf_model(tmp_path, kind, tie, shard):
    hf = hf_model(kind, tie)
    hf.save_pretrained(tmp_path, max_shard_size="50KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    model = MGQATransformer.from_pretrained(str(tmp_path))
    assert (model.config.heads, model.config.kv_heads, model.config.tie_embeddings) == (8, 2, tie)
    tokens = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-4
    prompt = tokens[:1, :6]
    assert torch.equal(hf_greedy(hf, prompt, 12), model.generate(prompt, 12, temperature=0.0))


def test_import_refuses_what_it_cannot_compute(tmp_path):
    hf = hf_model("llama")
    hf.config.attention_bias = True
    hf.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="attention_bias=True is not supported"):
        MGQATransformer.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MGQATransformer.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "model.safetensors").unlink()
    hf.config.attention_bias = False
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="holds neither model.safetensors"):
        MGQATransformer.from_pretrained(str(tmp_path))
