"""Tokenizers. The default is byte-level: 256 byte values plus special tokens, no files needed."""

from __future__ import annotations

from typing import Iterable

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; ``<|endoftext|>`` is token 256.

    Decoding replaces byte sequences that are not valid UTF-8 (a sampled model can emit them).
    """

    name = "byte"
    special_tokens = ("<|endoftext|>",)

    def __init__(self) -> None:
        self.eot_id = 256

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """text -> (N,) int64 tokens without a Python list in between."""
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.empty(0, dtype=torch.long)
        return torch.frombuffer(data, dtype=torch.uint8).long()

    def decode(self, tokens: Iterable[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

    def state(self) -> dict:
        """Plain data identifying this tokenizer; stored with checkpoints."""
        return {"name": self.name, "vocab_size": self.vocab_size}


def build_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer called ``name`` (``byte``)."""
    if name == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; available: ['byte']")
