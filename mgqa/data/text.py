"""Text files -> documents -> one token stream -> fixed windows for next-token prediction."""

from __future__ import annotations

import glob
import random
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from mgqa.data.tokenizer import ByteTokenizer


def resolve_files(pattern: str | Sequence[str]) -> list[Path]:
    """Expand one glob or a list of globs/paths into sorted files; raise naming what matched nothing."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(Path(p) for p in glob.glob(str(pat), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise FileNotFoundError(f"data file pattern {str(pat)!r} matched no files (cwd: {Path.cwd()})")
        files.extend(matches)
    return files


def read_documents(files: Sequence[Path]) -> list[str]:
    """One document per file, decoded as UTF-8; names the file that is not text."""
    docs = []
    for path in files:
        try:
            docs.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    return docs


def split_documents(docs: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``val_fraction`` of the documents (at least one) for validation, chosen by ``seed``.

    Whole documents go to one side, so no text is in both splits.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to hold one out for validation, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    val_ids = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def pack(docs: Sequence[str], tokenizer: ByteTokenizer) -> torch.Tensor:
    """Tokenize and join documents, each followed by the end-of-text token -> (T,) int64."""
    eot = torch.tensor([tokenizer.eot_id], dtype=torch.long)
    parts = []
    for doc in docs:
        parts.extend((tokenizer.encode_tensor(doc), eot))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


class PackedWindows(Dataset):
    """Consecutive windows of ``seq_len + 1`` tokens (inputs and shifted targets), stride ``seq_len``,
    so every token of the stream is a target exactly once; the tail shorter than a window is dropped."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"{tokens.numel()} tokens cannot fill one window of seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]
        return window[:-1], window[1:]  # (N,), (N,)
