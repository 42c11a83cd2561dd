"""``MGQATransformer``: token embedding, a GQA ``Decoder``, and the language-model head."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator, Optional

import torch
from torch import nn

from mgqa.model.attention import KVCache
from mgqa.model.config import ConfigError, ModelConfig
from mgqa.model.decoder import Decoder
from mgqa.model.layers import RotaryEmbedding
from mgqa.model.sampling import sample_next


class MGQATransformer(nn.Module):
    """Decoder-only language model with grouped-query attention.

    >>> model = MGQATransformer(num_tokens=20000, max_seq_len=1024,
    ...     attn_layers=Decoder(dim=512, depth=12, heads=8, attn_kv_heads=2))

    ``forward(tokens (B, N)) -> logits (B, N, num_tokens)``. Extra keyword arguments are
    ``ModelConfig`` fields that override the decoder's (``tie_embedding`` is accepted for
    ``tie_embeddings``).
    """

    def __init__(self, num_tokens: int, max_seq_len: int, attn_layers: Decoder, **overrides: Any) -> None:
        super().__init__()
        if not isinstance(attn_layers, Decoder):
            raise ConfigError(f"attn_layers must be a mgqa Decoder, got {type(attn_layers).__name__}")
        if "tie_embedding" in overrides:
            overrides["tie_embeddings"] = overrides.pop("tie_embedding")
        values = {**attn_layers.config.to_dict(), **overrides, "num_tokens": num_tokens, "max_seq_len": max_seq_len}
        if num_tokens is None:
            raise ConfigError("num_tokens must be set to the vocabulary size, got None")
        self.config = ModelConfig.from_dict(values)
        if self.config != replace(attn_layers.config, num_tokens=num_tokens, max_seq_len=max_seq_len):
            attn_layers = Decoder(**_decoder_args(self.config))  # an override changed the layers
        cfg = self.config
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.pos_emb == "absolute" else None
        self.rotary = RotaryEmbedding(cfg.resolved_head_dim, cfg.rotary_base) if cfg.pos_emb == "rotary" else None
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.attn_layers = attn_layers
        self.to_logits = nn.Linear(cfg.dim, cfg.num_tokens, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.to_logits.weight = self.token_emb.weight

    @classmethod
    def from_config(cls, cfg: ModelConfig | dict) -> "MGQATransformer":
        if isinstance(cfg, dict):
            cfg = ModelConfig.from_dict(cfg)
        if cfg.num_tokens is None:
            raise ConfigError("model.num_tokens is unset; set it or let the training script derive it from the tokenizer")
        return cls(cfg.num_tokens, cfg.max_seq_len, Decoder(**_decoder_args(cfg)))

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("attn.out", "ff.w_out")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_emb.weight.numel()
            if self.pos_emb is not None:
                total -= self.pos_emb.weight.numel()
        return total

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes each generated position costs (all layers, K and V)."""
        cfg = self.config
        return 2 * cfg.depth * cfg.kv_heads * cfg.resolved_head_dim * torch.empty((), dtype=dtype).element_size()

    def new_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:
        cfg = self.config
        ref = self.token_emb.weight
        dtype = torch.get_autocast_dtype(ref.device.type) if torch.is_autocast_enabled(ref.device.type) else ref.dtype
        return KVCache(
            batch,
            cfg.depth,
            cfg.kv_heads,
            capacity or cfg.max_seq_len,
            cfg.resolved_head_dim,
            dtype=dtype,
            device=ref.device,
        )

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """tokens: (B, N) int64 -> logits (B, N, num_tokens). With ``cache``, the tokens continue
        the cached positions and the cache is extended by N."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        start = cache.length if cache is not None else 0
        if start + n > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + n} tokens is longer than model.max_seq_len={self.config.max_seq_len}"
            )
        positions = torch.arange(start, start + n, device=tokens.device)  # (N,)
        x = self.token_emb(tokens)  # (B, N, dim)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.emb_dropout(x)
        rope = self.rotary(positions) if self.rotary is not None else None
        x = self.attn_layers(x, rope=rope, cache=cache)  # (B, N, dim)
        if cache is not None:
            cache.advance(n)
        return self.to_logits(x)  # (B, N, V)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, max_seq_len: Optional[int] = None) -> "MGQATransformer":
        """A local Hugging Face Llama-family directory (config.json + safetensors, sharded or not).

        ``max_seq_len`` caps the checkpoint's ``max_position_embeddings`` (the KV cache is sized by it).
        See ``mgqa.convert.hf_import``.
        """
        from mgqa.convert.hf_import import load_hf_model  # noqa: PLC0415 (reads safetensors only when asked)

        return load_hf_model(path, dtype=dtype, max_seq_len=max_seq_len)

    @torch.no_grad()
    def generate_stream(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        *,
        eos_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens (B,) after ``prompt`` (B, N), at most ``max_new_tokens`` steps.

        ``temperature=0`` is greedy. With ``use_cache`` each step feeds one token through a KV cache;
        once the context reaches ``max_seq_len`` a window slides over the last ``max_seq_len`` tokens.
        After ``eos_token`` a sequence keeps emitting ``eos_token``; the stream ends when all have.
        """
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        if prompt.shape[1] == 0:
            raise ValueError("prompt must hold at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return
        was_training = self.training
        self.eval()
        try:
            max_len = self.config.max_seq_len
            seq = prompt[:, -max_len:]
            cache = self.new_cache(seq.shape[0]) if use_cache else None
            logits = self(seq, cache=cache)[:, -1]  # (B, V)
            finished = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
            for step in range(max_new_tokens):
                token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                if eos_token is not None:
                    token = torch.where(finished, torch.full_like(token, eos_token), token)
                    finished |= token == eos_token
                yield token  # (B,)
                if step == max_new_tokens - 1 or (eos_token is not None and bool(finished.all())):
                    return
                seq = torch.cat((seq, token[:, None]), dim=1)[:, -max_len:]
                if cache is not None and cache.length < max_len:
                    logits = self(token[:, None], cache=cache)[:, -1]
                else:
                    logits = self(seq)[:, -1]  # uncached, or the window slid past the cache
        finally:
            self.train(was_training)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        *,
        use_cache: bool = True,
        eos_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt`` (B, N); returns them, (B, max_new_tokens).

        Collects ``generate_stream``; a sequence that ended at ``eos_token`` is padded with it.
        """
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        out = list(
            self.generate_stream(
                prompt, max_new_tokens, temperature, top_k, top_p,
                eos_token=eos_token, generator=generator, use_cache=use_cache,
            )
        )  # fmt: skip
        if not out:
            return prompt.new_empty((prompt.shape[0], 0))
        tokens = torch.stack(out, dim=1)  # (B, steps)
        if tokens.shape[1] < max_new_tokens and eos_token is not None:
            pad = tokens.new_full((tokens.shape[0], max_new_tokens - tokens.shape[1]), eos_token)
            tokens = torch.cat((tokens, pad), dim=1)
        return tokens


def _decoder_args(cfg: ModelConfig) -> dict[str, Any]:
    args = cfg.to_dict()
    args.pop("num_tokens")
    args.pop("max_seq_len")
    return args
