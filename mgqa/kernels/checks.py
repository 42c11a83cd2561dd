"""What the attention kernels accept: one check per call, at the entry point.

Launchers and kernels trust their inputs; ``unsupported_reason`` is asked once, by
``mgqa.ops.attention`` (to route or refuse) or by ``triton_attention`` (to raise).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it at import; so do we
SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """None if the kernels can run these inputs, else a short reason a user can act on."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims (expected 4: batch, heads, seq, head_dim)"
    if not q.is_cuda and not INTERPRET:
        return f"inputs are on {q.device.type}"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v on different devices ({q.device}, {k.device}, {v.device})"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} not in (float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    head_dim = q.shape[-1]
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} not in {SUPPORTED_HEAD_DIMS}"
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return f"head_dim differs: q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
    if q.shape[0] != k.shape[0]:
        return f"batch differs: q {q.shape[0]}, k {k.shape[0]}"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return f"query heads ({q.shape[1]}) not a multiple of KV heads ({k.shape[1]})"
    return None


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError naming the offending value if the kernels cannot run these inputs."""
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"triton attention: {reason}")
