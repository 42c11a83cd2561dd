"""``MGQATransformer``: token embedding, a GQA ``Decoder``, and the language-model head."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterator, Optional

import torch
from torch import nn

from mgqa import ops

from mgqa.model.attention import KVCache
from mgqa.model.config import ConfigError, ModelConfig
from mgqa.model.decoder import Decoder
from mgqa.model.generation import Prompt, release_decode_step, stream_tokens
from mgqa.model.layers import RotaryEmbedding
from mgqa.model.static_cache import StaticKVCache


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

    def compile_blocks(self, mode: str = "default", **options: Any) -> None:
        """``torch.compile`` each decoder block in place (parameter names unchanged), in ``mode``
        (``torch.compile``'s: default, max-autotune-no-cudagraphs, max-autotune, reduce-overhead).

        Per block, as torchtitan does: the blocks share one graph, so compiling costs one block's
        time whatever the depth, and per-block FSDP wrapping and activation checkpointing compose
        with it. The embedding and the chunked loss stay uncompiled.
        """
        for block in self.attn_layers.blocks:
            block.compile(mode=mode, **options)

    def training_flops_per_token(self, seq_len: int) -> int:
        """Matrix FLOPs of one trained token (forward and backward) at context ``seq_len``.

        6 per non-embedding parameter, plus attention's 6 * depth * heads * head_dim * seq_len,
        which is 12 * ... halved for the causal mask (the PaLM / nanoGPT MFU convention).
        """
        cfg = self.config
        attention = 6 * cfg.depth * cfg.heads * cfg.resolved_head_dim * seq_len
        return 6 * self.num_parameters(non_embedding=True) + attention

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes each generated position costs (all layers, K and V)."""
        cfg = self.config
        return 2 * cfg.depth * cfg.kv_heads * cfg.resolved_head_dim * torch.empty((), dtype=dtype).element_size()

    def _cache_dtype(self) -> torch.dtype:
        ref = self.token_emb.weight
        return torch.get_autocast_dtype(ref.device.type) if torch.is_autocast_enabled(ref.device.type) else ref.dtype

    def new_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:
        cfg = self.config
        ref = self.token_emb.weight
        dtype = self._cache_dtype()
        return KVCache(
            batch,
            cfg.depth,
            cfg.kv_heads,
            capacity or cfg.max_seq_len,
            cfg.resolved_head_dim,
            dtype=dtype,
            device=ref.device,
        )

    def new_static_cache(self, batch: int, capacity: Optional[int] = None) -> StaticKVCache:
        """A cache allocated once with a length per sequence (fast, batched, graph-captured decoding)."""
        cfg = self.config
        capacity = capacity or cfg.max_seq_len
        if capacity > cfg.max_seq_len:
            raise ValueError(f"cache capacity {capacity} is longer than model.max_seq_len={cfg.max_seq_len}")
        return StaticKVCache(batch, cfg.depth, cfg.kv_heads, capacity, cfg.resolved_head_dim,
                             dtype=self._cache_dtype(), device=self.token_emb.weight.device)

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache | StaticKVCache] = None) -> torch.Tensor:
        """tokens: (B, N) int64 -> logits (B, N, num_tokens). With ``cache``, the tokens continue
        the cached positions and the cache is extended by N."""
        self._check_token_ids(tokens)
        return self.to_logits(self.hidden_states(tokens, cache=cache))  # (B, N, V)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens`` (B, N) against ``targets`` (B, N), float32.

        Equal to ``F.cross_entropy(self(tokens).flatten(0, 1).float(), targets.flatten())``, computed
        in chunks of rows so that the batch's full logits are never held (``mgqa.ops.cross_entropy``).
        """
        self._check_token_ids(tokens)
        return ops.linear_cross_entropy(
            self.hidden_states(tokens), self.to_logits.weight, targets, ignore_index=ignore_index
        )

    def hidden_states(self, tokens: torch.Tensor, cache: Optional[KVCache | StaticKVCache] = None) -> torch.Tensor:
        """tokens: (B, N) int64 -> the final norm's output (B, N, dim), before the LM head."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        batch, n = tokens.shape
        if isinstance(cache, StaticKVCache):
            # Each sequence continues at its own length; read on the device, never on the host.
            positions = cache.positions(n)  # (B, N)
        else:
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
        rope = None
        if self.rotary is not None:
            cos, sin = self.rotary(positions.reshape(-1))  # (B*N or N, D)
            rope = (cos.view(batch, 1, n, -1), sin.view(batch, 1, n, -1)) if positions.dim() == 2 else (cos, sin)
        x = self.attn_layers(x, rope=rope, cache=cache)  # (B, N, dim)
        if cache is not None:
            cache.advance(n)
        return x

    def generate_stream(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        *,
        eos_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        use_cache: bool = True,
        cuda_graph: Optional[bool] = None,
        compile_step: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens (B,) after ``prompt``, up to ``max_new_tokens`` steps.

        ``prompt``: (B, N) or (N,) token ids, or a list of 1-d sequences of different lengths (each
        sequence decodes from its own length; nothing is padded after the prompt). ``temperature=0``
        is greedy; ``top_k`` / ``top_p`` filter before sampling. With ``use_cache`` the prompt fills
        a KV cache allocated once and each step feeds one token; ``cuda_graph`` (default: on for a
        CUDA model) captures that step, sampling included, in a CUDA graph and replays it. Once a
        sequence reaches ``max_seq_len`` a window slides over its last ``max_seq_len`` tokens.
        After ``eos_token`` a sequence keeps emitting ``eos_token``; the stream stops when all have.
        ``compile_step`` runs the decode step through ``torch.compile`` first (fewer, fused kernels;
        a one-off compile of tens of seconds for a large model).
        """
        return stream_tokens(self, prompt, max_new_tokens, temperature, top_k, top_p, eos_token=eos_token,
                             generator=generator, use_cache=use_cache, cuda_graph=cuda_graph,
                             compile_step=compile_step)

    def release_decode_step(self) -> None:
        """Free the captured decode step and KV cache kept since the last ``generate`` on CUDA."""
        release_decode_step(self)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, max_seq_len: Optional[int] = None) -> "MGQATransformer":
        """A local Hugging Face Llama-family directory (config.json + safetensors, sharded or not).

        ``max_seq_len`` caps the checkpoint's ``max_position_embeddings`` (the KV cache is sized by it).
        See ``mgqa.convert.hf_import``.
        """
        from mgqa.convert.hf_import import load_hf_model  # noqa: PLC0415 (reads safetensors only when asked)

        return load_hf_model(path, dtype=dtype, max_seq_len=max_seq_len)

    def _check_token_ids(self, tokens: torch.Tensor) -> None:
        """An id outside [0, num_tokens) names itself, instead of an embedding ``IndexError`` (CPU) or a
        device-side assert (CUDA). Skipped while compiling or capturing a CUDA graph, and in CUDA
        training, where the batches come from the tokenizer ``num_tokens`` was checked against and a
        host sync per step would cost time. ``hidden_states`` (the trunk that generation steps call
        with the model's own samples) does not check; ``forward``, ``loss`` and generation's prompt do."""
        if tokens.numel() == 0 or torch.compiler.is_compiling() or (self.training and tokens.is_cuda):
            return
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        low, high = (int(t) for t in torch.aminmax(tokens))
        if low < 0 or high >= self.config.num_tokens:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range: ids must be in [0, num_tokens={self.config.num_tokens})")

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        *,
        use_cache: bool = True,
        eos_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        cuda_graph: Optional[bool] = None,
        compile_step: bool = False,
    ) -> torch.Tensor:
        """``generate_stream``'s tokens collected: (B, max_new_tokens), padded with ``eos_token``
        after an early stop."""
        stream = self.generate_stream(prompt, max_new_tokens, temperature, top_k, top_p, eos_token=eos_token,
                                      generator=generator, use_cache=use_cache, cuda_graph=cuda_graph,
                                      compile_step=compile_step)
        out = list(stream)
        batch = prompt.shape[0] if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 else \
            1 if isinstance(prompt, torch.Tensor) else len(prompt)
        if not out:
            return torch.empty((batch, 0), dtype=torch.long, device=self.token_emb.weight.device)
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
