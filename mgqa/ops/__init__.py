"""The one place that picks an attention implementation.

``attention(q, k, v, causal=..., backend=...)`` dispatches to:

- ``"reference"``: plain PyTorch math in float32, the test oracle;
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa``;
- ``"triton"``: mgqa's own Triton kernels (``mgqa.kernels``), CUDA only;
- ``"auto"``: the faster of the two where both run, by measurement (``auto_choice``): SDPA where
  it runs cuDNN's attention (Hopper and newer, fp16/bf16, head_dim <= 128), which trains a model
  end to end faster than mgqa's kernels there; Triton on other CUDA GPUs where the kernels support
  the inputs; SDPA otherwise. The choice is logged once per distinct reason. A decode step (1..8
  queries after more cached keys, no gradient) goes to the decode kernel on CUDA.

``linear_cross_entropy(hidden, weight, targets)`` is the language-model loss computed in chunks of
rows, never holding the batch's full logits. ``linear(x, weight, bias)`` is the blocks' projection:
under half-precision autocast its float32 weight gradient comes straight out of the matrix product.

``decode_attention(q, k_cache, v_cache, lengths, ...)`` is attention of a few new positions per
sequence over a preallocated cache with per-sequence lengths; the same backends, where "triton" is
the GQA-packed split-K decode kernel (``mgqa.kernels.decode``).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from mgqa.ops.cross_entropy import linear_cross_entropy
from mgqa.ops.projection import linear
from mgqa.ops.reference import cache_mask, causal_mask, reference_attention, reference_decode_attention
from mgqa.ops.sdpa import sdpa_attention, sdpa_decode_attention

__all__ = [
    "attention",
    "auto_choice",
    "available_backends",
    "BackendUnavailable",
    "cache_mask",
    "causal_mask",
    "decode_attention",
    "linear",
    "linear_cross_entropy",
    "reference_attention",
    "reference_decode_attention",
]

BACKENDS = ("auto", "sdpa", "reference", "triton")
log = logging.getLogger("mgqa.ops")
_announced: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """The requested attention backend cannot run these inputs on this machine."""


def _triton_module():
    """The Triton kernels module, or a string saying why it can't be used."""
    try:
        import mgqa.kernels as triton_kernels  # noqa: PLC0415 (optional dependency)
    except ImportError as err:  # triton missing, or the kernels not built for this platform
        return f"mgqa's Triton kernels could not be imported ({err})"
    return triton_kernels


def _triton_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    module = _triton_module()
    if isinstance(module, str):
        return module
    return module.unsupported_reason(q, k, v)


def _decode_module():
    """The Triton decode kernel module, or a string saying why it can't be used."""
    try:
        from mgqa.kernels import decode as decode_kernels  # noqa: PLC0415 (optional dependency)
    except ImportError as err:
        return f"mgqa's Triton decode kernel could not be imported ({err})"
    return decode_kernels


def _decode_unsupported_reason(q, k_cache, v_cache, lengths) -> Optional[str]:
    module = _decode_module()
    if isinstance(module, str):
        return module
    return module.unsupported_reason(q, k_cache, v_cache, lengths)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def available_backends() -> list[str]:
    """Backends that can run on this machine (``triton`` needs the kernels and a CUDA device)."""
    names = ["sdpa", "reference"]
    if torch.cuda.is_available() and not isinstance(_triton_module(), str):
        names.append("triton")
    return names


@torch.compiler.assume_constant_result
def _cudnn_attention_ready(device_index: int) -> bool:
    """SDPA dispatches to cuDNN's attention on this device: Hopper or newer, cuDNN SDPA enabled."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0) and torch.backends.cuda.cudnn_sdp_enabled()


def auto_choice(
    *, device_type: str, dropout_p: float, cudnn_ready: bool, dtype: torch.dtype, head_dim: int,
    triton_unsupported: Optional[str] | Callable[[], Optional[str]],
) -> tuple[str, str]:
    """The backend ``auto`` runs, and why: a pure function of the call's properties.
    ``triton_unsupported`` (why the Triton kernels cannot run the inputs, or None) may be a function,
    asked only where the choice depends on it.

    On Hopper, SDPA's cuDNN kernel trains a whole model faster than mgqa's Triton kernels
    (``bench/train_throughput.py``: cuDNN's forward+backward leads at every measured shape), so
    it runs wherever cuDNN takes the call. Elsewhere on CUDA the Triton kernels run where they
    support the inputs; the rest goes to SDPA.
    """
    if device_type != "cuda":
        return "sdpa", f"inputs on {device_type}"
    if dropout_p > 0.0:
        return "sdpa", "attention dropout is on"
    if cudnn_ready and dtype in (torch.float16, torch.bfloat16) and head_dim <= 128:
        return "sdpa", "cuDNN attention through SDPA, faster than mgqa's kernels end to end on this GPU"
    why_not = triton_unsupported() if callable(triton_unsupported) else triton_unsupported
    if why_not:
        return "sdpa", why_not
    return "triton", "CUDA inputs the kernels support"


def _announce(choice: str, reason: str) -> None:
    if torch.compiler.is_compiling():
        return  # a log call would split the compiled graph; compiled calls go unannounced
    key = (choice, reason)
    if key not in _announced:
        _announced.add(key)
        log.info("attention backend 'auto' chose %s (%s)", choice, reason)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects 4-d q (B, H, Nq, D), k and v (B, Hkv, Nk, D); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head_dim (dim 3)"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped-query attention.

    q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H % Hkv == 0. Query head h reads KV head
    h // (H / Hkv); K/V are never copied per query head. ``causal`` masks are aligned to the
    bottom-right (query i sits at position Nk - Nq + i). ``scale`` defaults to 1/sqrt(D).
    Returns (B, H, Nq, D) in q's dtype.
    """
    _check_shapes(q, k, v)
    fn: Callable[..., torch.Tensor]
    routed = backend == "auto"
    if routed:
        on_cuda = q.is_cuda
        if on_cuda and dropout_p == 0.0 and q.shape[2] <= 8 and k.shape[2] > q.shape[2] and not _needs_grad(q, k, v):
            # A decode step after a cache: one K/V read per group beats the training kernels' query tiles.
            lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)  # (B,)
            if _decode_unsupported_reason(q, k, v, lengths) is None:
                _announce("triton decode", "a decode step on CUDA")
                return _decode_module().compiled_decode_attention(q, k, v, lengths, causal=causal, scale=scale)
        device_index = q.device.index if q.device.index is not None or not on_cuda else torch.cuda.current_device()
        choice, reason = auto_choice(
            device_type=q.device.type,
            dropout_p=dropout_p,
            cudnn_ready=on_cuda and _cudnn_attention_ready(device_index),
            dtype=q.dtype,
            head_dim=q.shape[-1],
            triton_unsupported=lambda: _triton_unsupported_reason(q, k, v),
        )
        _announce(choice, reason)
        backend = choice
    if backend == "sdpa":
        fn = sdpa_attention
    elif backend == "reference":
        fn = reference_attention
    elif backend == "triton":
        if dropout_p > 0.0:
            raise BackendUnavailable(
                f"backend='triton' has no attention dropout (dropout_p={dropout_p}); use 'sdpa' or set dropout to 0"
            )
        # auto takes the kernels only after their check found nothing: check the inputs once per call.
        why_not = None if routed else _triton_unsupported_reason(q, k, v)
        if why_not:
            raise BackendUnavailable(f"backend='triton' cannot run these inputs: {why_not}")
        return _triton_module().run_checked(q, k, v, causal, scale)  # checked once, just above
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    return fn(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the last Nq positions of each sequence over a preallocated KV cache.

    q: (B, H, Nq, D); k_cache, v_cache: (B, Hkv, L, D) with H % Hkv == 0; lengths: (B,) integer
    tensor on q's device, the valid positions of each sequence (Nq <= lengths[b] <= L), whose last
    Nq are the queries. ``causal``: query i of sequence b sees positions up to lengths[b] - Nq + i.
    ``auto`` takes the Triton decode kernel on CUDA where it supports the inputs (1..8 queries,
    head_dim a multiple of 8 up to 256, no gradients needed), SDPA with a length mask otherwise;
    nothing here synchronises with the device, so a decode step can be captured in a CUDA graph.
    Returns (B, H, Nq, D) in q's dtype.
    """
    _check_shapes(q, k_cache, v_cache)
    if tuple(lengths.shape) != (q.shape[0],) or lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"lengths must be an int32/int64 tensor of shape ({q.shape[0]},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    if backend == "auto":
        if not q.is_cuda:
            choice, reason = "sdpa", f"inputs on {q.device.type}"
        elif _needs_grad(q, k_cache, v_cache):
            choice, reason = "sdpa", "gradients are needed (the decode kernel is inference-only)"
        else:
            why_not = _decode_unsupported_reason(q, k_cache, v_cache, lengths)
            choice, reason = ("sdpa", why_not) if why_not else ("triton", "CUDA inputs the decode kernel supports")
        _announce(f"{choice} decode", reason)
        backend = choice
    if backend == "sdpa":
        return sdpa_decode_attention(q, k_cache, v_cache, lengths, causal=causal, scale=scale)
    if backend == "reference":
        return reference_decode_attention(q, k_cache, v_cache, lengths, causal=causal, scale=scale)
    if backend == "triton":
        why_not = _decode_unsupported_reason(q, k_cache, v_cache, lengths)
        if _needs_grad(q, k_cache, v_cache):
            why_not = "gradients are needed and the decode kernel has no backward; use 'sdpa' or torch.no_grad()"
        if why_not:
            raise BackendUnavailable(f"backend='triton' cannot run this decode step: {why_not}")
        return _decode_module().compiled_decode_attention(q, k_cache, v_cache, lengths, causal=causal, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
