"""The ~1B Llama-like model of bench/decode.py, in mgqa and as Hugging Face ``LlamaForCausalLM``
with the same weights (q/k/v from the fused qkv rows, gate/up from the fused SwiGLU input)."""

from __future__ import annotations

import torch

MODEL_1B = dict(dim=2048, depth=16, heads=16, kv_heads=4, ff_mult=6.0, num_tokens=32000)  # SwiGLU hidden 8192
MODEL_SMOKE = dict(dim=64, depth=2, heads=4, kv_heads=2, ff_mult=4.0, num_tokens=100)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def build_mgqa(shape: dict, max_seq_len: int, device, dtype):
    from mgqa import Decoder, MGQATransformer

    torch.manual_seed(0)
    layers = Decoder(dim=shape["dim"], depth=shape["depth"], heads=shape["heads"], attn_kv_heads=shape["kv_heads"],
                     pos_emb="rotary", norm="rmsnorm", ff="swiglu", ff_mult=shape["ff_mult"], bias=False)
    with torch.device(device):
        model = MGQATransformer(num_tokens=shape["num_tokens"], max_seq_len=max_seq_len, attn_layers=layers)
    return model.to(dtype).eval()


def to_hf_llama(model, dtype):
    """The same weights as a Hugging Face ``LlamaForCausalLM``: q/k/v from the fused qkv rows, gate/up
    from the fused SwiGLU input (gate first), norms and embeddings as they are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    head_dim, hidden = cfg.resolved_head_dim, model.attn_layers.blocks[0].ff.w_out.in_features
    hf_cfg = LlamaConfig(vocab_size=cfg.num_tokens, hidden_size=cfg.dim, intermediate_size=hidden,
                         num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                         head_dim=head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                         rope_theta=cfg.rotary_base, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    device = model.token_emb.weight.device
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg).to(dtype)
    hf.generation_config.eos_token_id = None  # random weights: never stop early, never mask a token
    hf.generation_config.bos_token_id = None
    q_rows, kv_rows = cfg.heads * head_dim, cfg.kv_heads * head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.token_emb.weight)
        hf.lm_head.weight.copy_(model.to_logits.weight)
        hf.model.norm.weight.copy_(model.attn_layers.norm.weight)
        for block, layer in zip(model.attn_layers.blocks, hf.model.layers):
            q, k, v = block.attn.qkv.weight.split((q_rows, kv_rows, kv_rows))
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
            layer.self_attn.o_proj.weight.copy_(block.attn.out.weight)
            gate, up = block.ff.w_in.weight.chunk(2)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
            layer.mlp.down_proj.weight.copy_(block.ff.w_out.weight)
            layer.input_layernorm.weight.copy_(block.attn_norm.weight)
            layer.post_attention_layernorm.weight.copy_(block.ff_norm.weight)
    return hf.eval()


def hf_generate(hf, prompt, new_tokens: int, static: bool):
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    if static:
        kwargs["cache_implementation"] = "static"  # generate compiles the forward for a static cache on CUDA
    with torch.no_grad():
        return hf.generate(prompt, **kwargs)[:, prompt.shape[1]:]


def hf_or_reason(model, dtype):
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install transformers)"
    try:
        return to_hf_llama(model, dtype)
    except Exception as err:
        return f"could not build LlamaForCausalLM: {_error(err)}"
