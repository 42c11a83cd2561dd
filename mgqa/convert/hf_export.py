"""``MGQATransformer`` -> a Hugging Face ``LlamaForCausalLM`` directory, by an explicit weight map.

The directory holds ``config.json`` (``num_key_value_heads`` = our ``kv_heads``), ``model.safetensors``,
``generation_config.json`` and the tokenizer files, and loads with ``from_pretrained`` and
``AutoTokenizer`` without custom code. Only the Llama architecture maps: rotary positions, RMSNorm,
SwiGLU and no biases (``conf/model/llama.yaml``); anything else is refused naming the option.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mgqa.model.config import ConfigError, ModelConfig
from mgqa.model.layers import swiglu_hidden

# (our option, the value Llama needs, what a user sets)
LLAMA_REQUIREMENTS = (
    ("pos_emb", "rotary", "model.pos_emb=rotary"),
    ("norm", "rmsnorm", "model.norm=rmsnorm"),
    ("ff", "swiglu", "model.ff=swiglu"),
    ("bias", False, "model.bias=false"),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming every option that keeps ``cfg`` from being a Llama model."""
    blocking = [f"model.{name}={getattr(cfg, name)!r}" for name, need, _ in LLAMA_REQUIREMENTS if getattr(cfg, name) != need]
    if blocking:
        needed = ", ".join(fix for name, need, fix in LLAMA_REQUIREMENTS if getattr(cfg, name) != need)
        raise ConfigError(
            f"only the Llama architecture exports to Hugging Face; {', '.join(blocking)} blocks it "
            f"(Llama needs {needed}, as in model=llama)"
        )


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> ``LlamaForCausalLM`` names. The fused ``attn.qkv`` rows are q (heads * D),
    k (kv_heads * D), v (kv_heads * D); ``ff.w_in`` rows are gate, then up (value)."""
    check_exportable(cfg)
    d = cfg.resolved_head_dim
    q_w, kv_w = cfg.heads * d, cfg.kv_heads * d
    hidden = swiglu_hidden(cfg.dim, cfg.ff_mult)
    out = {"model.embed_tokens.weight": state["token_emb.weight"], "model.norm.weight": state["attn_layers.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["to_logits.weight"]
    for i in range(cfg.depth):
        ours, hf = f"attn_layers.blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split((q_w, kv_w, kv_w), dim=0)
        gate, up = state[ours + "ff.w_in.weight"].split((hidden, hidden), dim=0)
        out.update({
            hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": state[ours + "attn.out.weight"],
            hf + "post_attention_layernorm.weight": state[ours + "ff_norm.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": state[ours + "ff.w_out.weight"],
        })  # fmt: skip
    return out


def hf_config(cfg: ModelConfig, eos_token_id: int | None, dtype: str) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for ``cfg``."""
    check_exportable(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.num_tokens,
        "hidden_size": cfg.dim,
        "intermediate_size": swiglu_hidden(cfg.dim, cfg.ff_mult),
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rotary_base,  # the transformers 4.x key
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},  # 5.x
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def to_hf_llama(model: Any, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Any:
    """``model`` (an ``MGQATransformer``) as an in-memory ``LlamaForCausalLM`` on the same device, with
    the same weights copied (the peer that the benchmarks time against)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 (the hf extra)

    cfg = model.config
    config = LlamaConfig(**{k: v for k, v in hf_config(cfg, None, "float32").items() if k not in ("torch_dtype", "dtype")})
    config._attn_implementation = attn_implementation
    with torch.device(model.token_emb.weight.device):
        hf = LlamaForCausalLM(config).to(dtype)
    state = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (cfg.tie_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"weight map incomplete: missing {missing}, unexpected {unexpected}")
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = None  # never stop early
    return hf.eval()


def hf_tokenizer(tokenizer: Any) -> Any:
    """Our tokenizer as a ``transformers.PreTrainedTokenizerFast`` that encodes to the same ids.

    The byte tokenizer becomes a byte-level BPE without merges whose token ``b`` is byte ``b``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    try:
        from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (the `hf` extra)
    except ImportError as err:
        raise ConfigError("exporting to Hugging Face needs transformers: pip install 'mgqa[hf]'") from err

    if tokenizer.name == "byte":
        vocab = {char: b for b, char in _bytes_to_unicode().items()}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|endoftext|>"])
        eot = "<|endoftext|>"
    else:
        backend, eot = Tokenizer.from_str(tokenizer.tok.to_str()), tokenizer.eot_token
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, bos_token=eot, clean_up_tokenization_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def export_hf(model: Any, tokenizer: Any, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write ``model`` (an ``MGQATransformer``) and ``tokenizer`` as a Llama directory; returns it."""
    cfg = model.config
    check_exportable(cfg)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown; choose one of {sorted(DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir={str(out)!r} is a file, not a directory")
    hf_tok = hf_tokenizer(tokenizer)  # first: it needs transformers, and nothing is written without it
    from safetensors.torch import save_file  # noqa: PLC0415 (installed with transformers)

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {k: v.to("cpu", DTYPES[dtype]).contiguous() for k, v in to_hf_state_dict(state, cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos = tokenizer.eot_id
    (out / "config.json").write_text(json.dumps(hf_config(cfg, eos, dtype), indent=2) + "\n")
    generation = {"bos_token_id": eos, "eos_token_id": eos, "max_length": cfg.max_seq_len}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    hf_tok.save_pretrained(str(out))
    return out
