"""The model's hyperparameters: one typed dataclass, the single source of every default.

Hydra registers this class as the schema of the ``model`` config group, so ``conf/model/*.yaml``
presets only list what they change, and a typo or a wrongly typed value fails at composition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

POS_EMBS = ("rotary", "absolute")
NORMS = ("rmsnorm", "layernorm")
FEED_FORWARDS = ("swiglu", "gelu")
ATTN_BACKENDS = ("auto", "sdpa", "reference", "triton")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the value."""


@dataclass
class ModelConfig:
    """Decoder-only GQA transformer.

    The defaults are those of the original ``mgqa`` package (learned absolute positions,
    LayerNorm, GELU feed-forward with biases, untied embeddings); ``conf/model/llama.yaml``
    is the Llama-style preset (rotary, RMSNorm, SwiGLU, no bias).
    """

    dim: int
    depth: int
    heads: int
    kv_heads: Optional[int] = None  # None: as many KV heads as query heads (MHA); 1: MQA
    num_tokens: Optional[int] = None  # None: the tokenizer's vocabulary size
    max_seq_len: int = 1024
    head_dim: Optional[int] = None  # None: dim // heads
    pos_emb: str = "absolute"  # rotary | absolute
    rotary_base: float = 10000.0
    norm: str = "layernorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    ff: str = "gelu"  # swiglu | gelu
    ff_mult: float = 4.0  # hidden width = ff_mult * dim (SwiGLU: 2/3 of that, as in Llama)
    # Biases in every linear layer of the blocks (fused qkv, attention output, feed-forward) and in
    # LayerNorm; never in the LM head.
    bias: bool = True
    tie_embeddings: bool = False
    dropout: float = 0.0  # on attention probabilities, block residual branches and embeddings
    attn_backend: str = "auto"  # auto | sdpa | reference | triton, see mgqa.ops.attention
    # Recompute each block's activations in the backward pass instead of storing them: less
    # memory, about a third more compute. A run-time choice, not part of the architecture.
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            self.kv_heads = self.heads
        self.validate()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.heads

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head."""
        return self.heads // self.kv_heads

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot work."""
        for name in ("dim", "depth", "heads", "kv_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_tokens is not None and (not isinstance(self.num_tokens, int) or self.num_tokens < 1):
            raise ConfigError(f"model.num_tokens must be a positive integer or null, got {self.num_tokens!r}")
        if self.heads % self.kv_heads != 0:
            raise ConfigError(
                f"model.kv_heads ({self.kv_heads}) must divide model.heads ({self.heads}); "
                f"valid values: {[k for k in range(1, self.heads + 1) if self.heads % k == 0]}"
            )
        if self.head_dim is None and self.dim % self.heads != 0:
            raise ConfigError(
                f"model.dim ({self.dim}) must be divisible by model.heads ({self.heads}), "
                "or set model.head_dim explicitly"
            )
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ConfigError(f"model.head_dim must be a positive integer or null, got {self.head_dim!r}")
        if self.pos_emb not in POS_EMBS:
            raise ConfigError(f"model.pos_emb={self.pos_emb!r} is unknown; choose one of {POS_EMBS}")
        if self.pos_emb == "rotary" and self.resolved_head_dim % 2 != 0:
            raise ConfigError(f"rotary positions need an even head_dim, got {self.resolved_head_dim}")
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm={self.norm!r} is unknown; choose one of {NORMS}")
        if self.ff not in FEED_FORWARDS:
            raise ConfigError(f"model.ff={self.ff!r} is unknown; choose one of {FEED_FORWARDS}")
        if not self.ff_mult > 0:
            raise ConfigError(f"model.ff_mult must be positive, got {self.ff_mult!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"model.attn_backend={self.attn_backend!r} is unknown; choose one of {ATTN_BACKENDS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; known options: {sorted(known)}")
        return cls(**values)
