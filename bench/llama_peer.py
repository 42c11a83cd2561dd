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
    with torch.device(device):  # every parameter, the Decoder's too, is made on the device
        layers = Decoder(dim=shape["dim"], depth=shape["depth"], heads=shape["heads"], attn_kv_heads=shape["kv_heads"],
                         pos_emb="rotary", norm="rmsnorm", ff="swiglu", ff_mult=shape["ff_mult"], bias=False)
        model = MGQATransformer(num_tokens=shape["num_tokens"], max_seq_len=max_seq_len, attn_layers=layers)
    return model.to(dtype).eval()


def to_hf_llama(model, dtype):
    """The same weights as a Hugging Face ``LlamaForCausalLM`` (``mgqa.convert.hf_export``'s weight map)."""
    from mgqa.convert.hf_export import to_hf_llama as convert  # noqa: PLC0415 (needs transformers)

    return convert(model, dtype)


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
