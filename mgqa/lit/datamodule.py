"""LightningDataModule over packed token windows of local text files."""

from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from mgqa.data import PackedWindows, build_tokenizer, pack, read_documents, resolve_files, split_documents


class TextDataModule(L.LightningDataModule):
    """Documents from ``files`` (globs), split by document into train/val, packed into windows.

    Batches are ``(inputs, targets)``, each (batch_size, seq_len) int64. Training order is
    shuffled with a generator seeded by ``seed`` (a new order every epoch).
    """

    def __init__(
        self,
        files: str | Sequence[str],
        seq_len: int,
        batch_size: int,
        tokenizer: str = "byte",
        val_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a non-negative integer, got {num_workers!r}")
        self.files = files
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.tokenizer = build_tokenizer(tokenizer)
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Optional[PackedWindows] = None
        self.val_set: Optional[PackedWindows] = None

    def check_files(self) -> None:
        """Fail early, naming the pattern, if the configured files don't exist."""
        resolve_files(self.files)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        docs = read_documents(resolve_files(self.files))
        train_docs, val_docs = split_documents(docs, self.val_fraction, self.seed)
        self.train_set = PackedWindows(pack(train_docs, self.tokenizer), self.seq_len)
        self.val_set = PackedWindows(pack(val_docs, self.tokenizer), self.seq_len)
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"training split has {len(self.train_set)} windows of {self.seq_len} tokens, fewer than "
                f"data.batch_size={self.batch_size}; lower the batch size or seq_len, or add text"
            )

    def _loader(self, dataset: PackedWindows, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
