"""LightningDataModule over prepared token shards (``python -m mgqa.data.prepare``), read by memory map."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from mgqa.data import build_tokenizer
from mgqa.data.shards import Shard, check_tokenizer, open_shards, read_manifest
from mgqa.data.tokens import TokenWindows
from mgqa.lit.datamodule import SplitDataModule
from mgqa.model.config import ConfigError


class TokenDataModule(SplitDataModule):
    """Batches ``(inputs, targets)``, each (batch_size, seq_len) int64, from the shards in ``dir``.

    The train and validation splits are the ones made at prepare time. Training windows come in a
    seeded order that changes every epoch, split evenly over ranks and workers; validation windows
    in order. The training loader is a ``StatefulDataLoader``: its saved position is a few integers
    per worker, so a resume starts at once wherever it stopped. ``tokenizer`` must be the one the
    shards were made with (compared by content hash).
    """

    def __init__(
        self,
        dir: str,
        seq_len: int,
        batch_size: int,
        tokenizer: str = "byte",
        eot_token: Optional[str] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.dir = Path(dir) if dir else None
        self.seq_len, self.batch_size = seq_len, batch_size
        self.tokenizer = build_tokenizer(tokenizer, eot_token)
        self.num_workers, self.seed = num_workers, seed
        self.train_set: Optional[TokenWindows] = None
        self.val_set: Optional[TokenWindows] = None
        self._shards: Optional[dict[str, list[Shard]]] = None
        # Each reader takes its own share (mgqa.data.tokens), so the length is exact with any number of
        # workers; Lightning warns about datasets that don't.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

    def check_files(self) -> None:
        """Fail early, naming the file and the values, on a missing or unfinished directory, a missing
        or truncated shard, or shards made by another tokenizer. (Checked here rather than in
        ``__init__``, whose errors Hydra's instantiate wraps in a traceback.)"""
        for name, value in (("seq_len", self.seq_len), ("batch_size", self.batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"data.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be a non-negative integer, got {self.num_workers!r}")
        if self.dir is None:
            raise ConfigError("data.dir is required: a directory made by python -m mgqa.data.prepare data=<config> out=<dir>")
        try:
            manifest = read_manifest(self.dir)
            check_tokenizer(manifest, self.tokenizer, self.dir)
            self._shards = {split: open_shards(self.dir, split, manifest) for split in ("train", "val")}
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def build_datasets(self, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        """Both splits for one rank. ``shuffle=False``: the training windows in the same order every epoch."""
        if self._shards is None:
            self.check_files()
        common = dict(seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed, rank=rank,
                      world_size=world_size, num_workers=self.num_workers)  # fmt: skip
        try:
            self.train_set = TokenWindows(self._shards["train"], shuffle=shuffle, split_name="training", **common)
            self.val_set = TokenWindows(self._shards["val"], shuffle=False, split_name="validation", **common)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        tokens = sum(s.num_tokens for s in self._shards["train"])
        rank_zero_info(
            f"data: {self.dir}: {tokens:,} training tokens in {len(self._shards['train'])} shard(s), "
            f"{self.train_set.num_windows:,} windows of {self.seq_len}; {len(self.train_set):,} batches per epoch per device"
        )

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": None,  # the dataset yields whole batches
            "num_workers": self.num_workers,
            # Persistent workers keep their dataset copy, which counts epochs for the order.
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
