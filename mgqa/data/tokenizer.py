"""Tokenizers: byte-level (the default, no files) or any Hugging Face ``tokenizers`` tokenizer.

``build_tokenizer(spec)`` takes ``byte``, a ``tokenizer.json`` file, a directory holding one (as saved
by ``mgqa.data.train_bpe`` or ``transformers``), or a hub name such as ``gpt2`` (needs network).
Every tokenizer has ``vocab_size``, ``eot_id`` (the end-of-text token that separates packed
documents), ``encode``/``encode_batch``/``decode`` and ``state()``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

# End-of-text tokens of common tokenizers, tried in order when ``eot_token`` is not given.
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


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

    def encode_batch(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return [self.encode_tensor(t) for t in texts]

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Token counts without building the tokens."""
        return [len(t.encode("utf-8")) for t in texts]

    def decode(self, tokens: Iterable[int]) -> str:
        return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")

    def state(self) -> dict:
        """Plain data identifying this tokenizer; stored with checkpoints."""
        return {"name": self.name, "vocab_size": self.vocab_size}


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (BPE, WordPiece, ...) with an end-of-text token for packing.

    ``encode_batch`` runs in the library's Rust thread pool. No special tokens are added around
    documents: packing adds ``eot_id`` after each one.
    """

    def __init__(self, tokenizer, name: str, eot_token: Optional[str] = None) -> None:
        self.tok = tokenizer
        self.name = name
        candidates = (eot_token,) if eot_token else EOT_CANDIDATES
        ids = [(t, tokenizer.token_to_id(t)) for t in candidates]
        found = [(t, i) for t, i in ids if i is not None]
        if not found:
            raise ValueError(
                f"tokenizer {name!r} has no end-of-text token: tried {list(candidates)}; set data.eot_token "
                "to one of its special tokens"
            )
        self.eot_token, self.eot_id = found[0]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode(text), dtype=torch.long)

    def encode_batch(self, texts: Sequence[str]) -> list[torch.Tensor]:
        encodings = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [torch.tensor(e.ids, dtype=torch.long) for e in encodings]

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode([int(t) for t in tokens], skip_special_tokens=True)

    def to_json(self) -> str:
        """The whole tokenizer as ``tokenizer.json`` text; checkpoints carry it (``from_json``)."""
        return self.tok.to_str()

    @classmethod
    def from_json(cls, text: str, name: str, eot_token: Optional[str] = None) -> "HFTokenizer":
        from tokenizers import Tokenizer  # noqa: PLC0415

        return cls(Tokenizer.from_str(text), name=name, eot_token=eot_token)

    def state(self) -> dict:
        """Plain data identifying this tokenizer: ``sha256`` of its JSON names it by content, so the same
        tokenizer matches whatever path it was loaded from."""
        digest = hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_token": self.eot_token, "sha256": digest}


def _load_hf(spec: str):
    from tokenizers import Tokenizer  # noqa: PLC0415 (not needed for the byte tokenizer)

    path = Path(spec)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(path / "tokenizer.json"))
        try:
            from transformers import AutoTokenizer  # noqa: PLC0415 (optional dependency)
        except ImportError as err:
            raise ValueError(
                f"tokenizer directory {spec!r} has no tokenizer.json; install transformers to load other formats"
            ) from err
        fast = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        if not hasattr(fast, "backend_tokenizer"):
            raise ValueError(f"tokenizer directory {spec!r} has no fast (tokenizers) backend")
        return fast.backend_tokenizer
    if spec.endswith(".json") or spec.startswith((".", "/")):
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist (cwd: {Path.cwd()})")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as err:  # the hub client raises several types (offline, not found, gated)
        raise ValueError(
            f"tokenizer {spec!r} is not 'byte', not a tokenizer.json file or directory, and could not be "
            f"loaded from the Hugging Face hub: {err}"
        ) from err


def build_tokenizer(name: str, eot_token: Optional[str] = None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer ``name``: ``byte``, a tokenizer.json file, a directory with one, or a hub name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"data.tokenizer must be 'byte', a tokenizer file/directory or a hub name, got {name!r}")
    if name == "byte":
        return ByteTokenizer()
    # A local file or directory is named by its file name, so that a checkpoint stays compatible with the
    # same tokenizer found at another path (another clone, another launch directory).
    label = Path(name).name if Path(name).exists() else name
    return HFTokenizer(_load_hf(name), name=label, eot_token=eot_token)
