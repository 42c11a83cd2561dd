"""A local Hugging Face Llama-family directory -> ``MGQATransformer``, by an explicit weight map.

Reads ``config.json`` and the safetensors weights (``model.safetensors`` or the shards listed in
``model.safetensors.index.json``) directly; ``transformers`` is not needed. Llama, TinyLlama and
Mistral-style GQA checkpoints map; a configuration our model cannot compute the same way (biases,
RoPE scaling, another activation) is refused naming the field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from mgqa.model.config import ConfigError, ModelConfig

log = logging.getLogger("mgqa")

MODEL_TYPES = ("llama", "mistral")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of an HF directory; raises naming the directory if it is not one."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {str(directory)!r} does not exist or is not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{directory} holds no config.json; it is not a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file} is not valid JSON ({err})") from err


def model_config_from_hf(hf: dict[str, Any], source: str, max_seq_len: Optional[int] = None) -> ModelConfig:
    """Our ``ModelConfig`` for an HF Llama-family ``config.json``; refuses what we cannot compute."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type={model_type!r} is not supported; supported: {MODEL_TYPES}")
    refusals = {
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "mlp_bias": (hf.get("mlp_bias", False), False),
    }
    for name, (value, need) in refusals.items():
        if value != need:
            raise ConfigError(f"{source}: {name}={value!r} is not supported (mgqa computes {name}={need!r})")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if hf.get("rope_scaling") or rope_type != "default":
        raise ConfigError(f"{source}: RoPE scaling ({hf.get('rope_scaling') or rope}) is not supported; only rope_type 'default'")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    intermediate = hf["intermediate_size"]
    if intermediate % 8 != 0:
        raise ConfigError(f"{source}: intermediate_size={intermediate} is not a multiple of 8, which mgqa's SwiGLU width needs")
    seq_len = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window is not None and window < seq_len:
        # Full attention equals sliding-window attention on sequences no longer than the window.
        log.info("%s: sliding_window=%d < max_position_embeddings=%d; max_seq_len is capped at the window", source, window, seq_len)
        seq_len = window
    if max_seq_len is not None:
        seq_len = min(seq_len, max_seq_len)
    return ModelConfig(
        dim=dim,
        depth=hf["num_hidden_layers"],
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        num_tokens=hf["vocab_size"],
        max_seq_len=seq_len,
        head_dim=None if head_dim * heads == dim else head_dim,
        pos_emb="rotary",
        rotary_base=float(theta),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        ff="swiglu",
        ff_mult=intermediate * 3 / (2 * dim),
        bias=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors file, or of all shards its index lists."""
    try:
        from safetensors.torch import load_file  # noqa: PLC0415 (the `hf` extra)
    except ImportError as err:
        raise ConfigError("reading Hugging Face weights needs safetensors: pip install 'mgqa[hf]'") from err

    directory = Path(path)
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in directory.iterdir())
        raise ConfigError(f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors load); it has {found}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        shard = directory / name
        if not shard.is_file():
            raise ConfigError(f"{directory}/{INDEX_FILE} lists {name}, which is missing")
        tensors.update(load_file(str(shard)))
    return tensors


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """``LlamaForCausalLM`` names -> ours; q/k/v rows fuse into ``attn.qkv``, gate/up into ``ff.w_in``."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # buffers older exports kept
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ConfigError(f"{source}: weight {name!r} is missing")
        used.add(name)
        return hf[name]

    state = {"token_emb.weight": take("model.embed_tokens.weight"), "attn_layers.norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        hf.setdefault("lm_head.weight", state["token_emb.weight"])
    state["to_logits.weight"] = take("lm_head.weight")
    for i in range(cfg.depth):
        ours, src = f"attn_layers.blocks.{i}.", f"model.layers.{i}."
        attn = [take(src + f"self_attn.{p}_proj.weight") for p in "qkv"]
        state.update({
            ours + "attn_norm.weight": take(src + "input_layernorm.weight"),
            ours + "attn.qkv.weight": torch.cat(attn, dim=0),
            ours + "attn.out.weight": take(src + "self_attn.o_proj.weight"),
            ours + "ff_norm.weight": take(src + "post_attention_layernorm.weight"),
            ours + "ff.w_in.weight": torch.cat((take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")), dim=0),
            ours + "ff.w_out.weight": take(src + "mlp.down_proj.weight"),
        })  # fmt: skip
    unused = sorted(set(hf) - used)
    if unused:
        raise ConfigError(f"{source}: weights mgqa has no place for: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
    return state


def read_hf(path: str | Path, max_seq_len: Optional[int] = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our state dict and ``ModelConfig`` for an HF directory (tensors in their stored dtype)."""
    source = str(path)
    cfg = model_config_from_hf(read_hf_config(path), source, max_seq_len)
    return from_hf_state_dict(read_hf_weights(path), cfg, source), cfg


def load_state(model: Any, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` (strict, cast to the model's dtype); a mismatch names the source."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).split("\n\t")[1:3]) or str(err)
        raise ConfigError(f"{source} does not fit the model it describes: {first}") from err


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32, max_seq_len: Optional[int] = None) -> Any:
    """An ``MGQATransformer`` with the weights of an HF directory, in ``dtype``, in eval mode."""
    from mgqa.model.transformer import MGQATransformer  # noqa: PLC0415 (the model calls into this module)

    state, cfg = read_hf(path, max_seq_len)
    model = MGQATransformer.from_config(cfg).to(dtype)
    load_state(model, state, str(path))
    return model.eval()
