"""Change the number of key/value heads of a trained model (Ainslie et al. 2023, "GQA", section 2.1).

Query head ``h`` reads KV head ``h // (heads / kv_heads)``, so the KV heads of one new group are
consecutive source heads. Going from ``s`` to ``t`` KV heads (``t`` divides ``s``), each new head is
made from ``s / t`` source heads by one method:

- ``mean``: their mean (the paper's choice; best in its Fig. 4);
- ``first``: the first of them;
- ``random``: a fresh N(0, 0.02) initialisation, as if trained from scratch.

More heads than the source (``s`` divides ``t``) copy each source head to the heads that now read it,
which computes the same function whatever the method; the same count is a plain copy.
"""

from __future__ import annotations

from typing import Optional

import torch

from mgqa.model.config import ConfigError, ModelConfig

METHODS = ("mean", "first", "random")


def check_kv_heads(source: ModelConfig, kv_heads: int, method: str) -> None:
    """Raise ConfigError naming the value if ``source`` cannot be converted to ``kv_heads`` by ``method``."""
    if method not in METHODS:
        raise ConfigError(f"init.method={method!r} is unknown; choose one of {METHODS}")
    valid = [k for k in range(1, source.heads + 1) if source.heads % k == 0 and (source.kv_heads % k == 0 or k % source.kv_heads == 0)]
    if kv_heads not in valid:
        raise ConfigError(
            f"init.kv_heads={kv_heads} cannot be made from the source's {source.kv_heads} KV heads "
            f"({source.heads} query heads); valid values: {valid}"
        )


def _regroup(rows: torch.Tensor, source_heads: int, kv_heads: int, method: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """rows: (source_heads * D, ...) projection rows of K or V -> (kv_heads * D, ...)."""
    heads = rows.reshape(source_heads, -1, *rows.shape[1:])  # (S, D, ...)
    if kv_heads >= source_heads:
        return heads.repeat_interleave(kv_heads // source_heads, dim=0).flatten(0, 1)
    grouped = heads.reshape(kv_heads, source_heads // kv_heads, *heads.shape[1:])  # (T, S/T, D, ...)
    if method == "mean":
        merged = grouped.float().mean(dim=1).to(rows.dtype)
    elif method == "first":
        merged = grouped[:, 0]
    else:
        merged = torch.empty_like(grouped[:, 0])
        if merged.dim() >= 3:  # a weight matrix; biases start at zero
            merged.copy_(torch.randn(merged.shape, generator=generator, dtype=torch.float32) * 0.02)
        else:
            merged.zero_()
    return merged.flatten(0, 1)


def convert_kv_heads(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    kv_heads: int,
    method: str = "mean",
    generator: Optional[torch.Generator] = None,
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """An ``MGQATransformer`` state dict and config with ``kv_heads`` KV heads; the input is not changed.

    Only the K and V rows of each block's fused ``attn.qkv`` projection change; the ``q`` rows and
    every other tensor are kept.
    """
    check_kv_heads(config, kv_heads, method)
    new_config = ModelConfig.from_dict({**config.to_dict(), "kv_heads": kv_heads})
    if kv_heads == config.kv_heads:
        return dict(state), new_config
    q_width = config.heads * config.resolved_head_dim
    kv_width = config.kv_heads * config.resolved_head_dim
    out = dict(state)
    for name, tensor in state.items():
        if not name.endswith(".attn.qkv.weight") and not name.endswith(".attn.qkv.bias"):
            continue
        q, k, v = tensor.split((q_width, kv_width, kv_width), dim=0)
        k = _regroup(k, config.kv_heads, kv_heads, method, generator)
        v = _regroup(v, config.kv_heads, kv_heads, method, generator)
        out[name] = torch.cat((q, k, v), dim=0).contiguous()
    return out, new_config
