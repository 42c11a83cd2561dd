"""Building blocks: norms, feed-forwards, rotary position embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mgqa import ops


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, with the weight gradient taken in float32 under half-precision autocast
    (``mgqa.ops.linear``)."""
    return ops.linear(x, layer.weight, layer.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps, bias=bias)


def swiglu_hidden(dim: int, mult: float) -> int:
    """SwiGLU's hidden width: 2/3 of ``mult * dim`` (keeping a GELU MLP's parameter count), a multiple of 8."""
    return int(round(mult * dim * 2 / 3 / 8)) * 8 or 8


class FeedForward(nn.Module):
    """GELU MLP (dim -> mult*dim -> dim) or SwiGLU (Shazeer 2020) with 2/3 of that width."""

    def __init__(self, dim: int, kind: str, mult: float, bias: bool, dropout: float) -> None:
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            hidden = swiglu_hidden(dim, mult)
            self.w_in = nn.Linear(dim, 2 * hidden, bias=bias)  # gate and value, fused
        else:
            hidden = int(mult * dim)
            self.w_in = nn.Linear(dim, hidden, bias=bias)
        self.w_out = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = project(self.w_in, x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.dropout(project(self.w_out, h))


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al. 2021), Llama's rotate-half layout."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (N,) integer positions -> cos, sin of shape (N, head_dim), float32."""
        freqs = torch.outer(positions.float(), self.inv_freq.to(positions.device))  # (N, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (N, D)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, D); cos, sin: (N, D). Rotates pairs (i, i + D/2) in float32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
