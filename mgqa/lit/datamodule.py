"""LightningDataModule over packed token windows streamed from local files or a hub dataset."""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from mgqa.data import (
    DocumentSource,
    PackedStream,
    check_file,
    build_tokenizer,
    count_tokens,
    holdout_by_count,
    holdout_by_hash,
    resolve_files,
)


class SplitDataModule(L.LightningDataModule):
    """What the data modules share: both splits built at set-up for this rank, a stateful training
    loader and a plain validation loader over them. Subclasses give ``build_datasets(rank, world_size,
    shuffle)`` and ``_loader_options()``."""

    train_set: Any = None
    val_set: Any = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        # trainer.overfit_batches (debug=overfit) means the same batches every epoch: no shuffling.
        overfit = trainer is not None and trainer.overfit_batches > 0
        self.build_datasets(rank, world, shuffle=not overfit)

    def train_dataloader(self) -> StatefulDataLoader:
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API on construction
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            return StatefulDataLoader(self.train_set, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, **self._loader_options())


class TextDataModule(SplitDataModule):
    """Documents from ``files`` (globs of txt/jsonl/parquet) or ``hub`` (``path``, ``name``, ``split``,
    ``val_split``), tokenized, packed into ``seq_len + 1`` windows and sharded over ranks and workers.

    Validation comes from ``val_files`` / ``hub.val_split`` if given, else from ``val_fraction`` of
    the documents, held out whole. Batches are ``(inputs, targets)``, each (batch_size, seq_len)
    int64. The training loader is a ``StatefulDataLoader``: Lightning stores its position in
    checkpoints, and a resumed run continues with the next batch of the interrupted epoch.
    ``batches_per_epoch``: null counts the corpus once at set-up so that an epoch covers it exactly;
    an integer skips the count (large or hub corpora). See ``mgqa.data.stream``. ``sample_prompt``: a
    text typical of the corpus, where the end-of-run sample starts (``sample.prompt`` reads it).
    """

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        files: str | Sequence[str] | None = None,
        val_files: str | Sequence[str] | None = None,
        hub: Optional[dict[str, Any]] = None,
        text_field: str = "text",
        tokenizer: str = "byte",
        eot_token: Optional[str] = None,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        shuffle_buffer: int = 10_000,
        batches_per_epoch: Optional[int] = None,
        val_batches: int = 16,
        seed: int = 0,
        sample_prompt: str = "\n",
    ) -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("val_batches", val_batches)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a non-negative integer, got {num_workers!r}")
        if (files is None) == (hub is None):
            raise ValueError("set exactly one of data.files (local files) or data.hub (a hub dataset)")
        hub = dict(hub or {})
        unknown = set(hub) - {"path", "name", "split", "val_split"}
        if unknown or (hub and not hub.get("path")):
            raise ValueError(f"data.hub takes path, name, split, val_split; got {sorted(hub)}")
        self.files, self.val_files, self.hub = files, val_files, hub
        self.text_field = text_field
        self.seq_len, self.batch_size = seq_len, batch_size
        self.tokenizer = build_tokenizer(tokenizer, eot_token)
        self.val_fraction = val_fraction
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.val_batches = val_batches
        self.seed = seed
        self.sample_prompt = sample_prompt
        self.train_set: Optional[PackedStream] = None
        self.val_set: Optional[PackedStream] = None
        # Each reader takes its own share (mgqa.data.stream), so the length is exact with any number of
        # workers; Lightning warns about datasets that don't.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        if num_workers > 0:
            # Workers are forked after the main process tokenized (the count); the Rust pool does not survive a fork.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def check_files(self) -> None:
        """Fail early, naming the pattern or file, if the configured files don't exist or are not
        readable text of their format (``mgqa.data.sources.check_file``)."""
        for pattern in (self.files, self.val_files):
            if pattern is not None:
                for path in resolve_files(pattern):
                    check_file(path, self.text_field)

    def _source(self, split: str) -> DocumentSource:
        if self.files is not None:
            files = self.files if split == "train" else self.val_files
            return DocumentSource(files=files, text_field=self.text_field)
        name = self.hub.get("split", "train") if split == "train" else self.hub["val_split"]
        return DocumentSource(hub_path=self.hub["path"], hub_name=self.hub.get("name"), split=name, text_field=self.text_field)

    def build_datasets(self, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        """Open the sources, count (unless ``batches_per_epoch`` is set) and build both splits for one rank.
        ``shuffle=False``: the training windows in the same order every epoch."""
        common = dict(
            tokenizer=self.tokenizer, seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed,
            rank=rank, world_size=world_size, num_workers=self.num_workers,
        )  # fmt: skip
        train_source = self._source("train")
        separate_val = self.val_files is not None or bool(self.hub.get("val_split"))
        val_source = self._source("val") if separate_val else train_source
        fixed = self.batches_per_epoch is not None
        train_counts = None if fixed else count_tokens(train_source, self.tokenizer)
        if separate_val:
            keep_train = keep_val = None
        elif fixed:
            keep_val = holdout_by_hash(self.val_fraction, self.seed)
            keep_train = keep_val.complement()
        else:
            keep_val = holdout_by_count(train_counts, self.val_fraction, self.seed)
            keep_train = keep_val.complement()
        if fixed and not separate_val:
            val_counts, val_batches = None, self.val_batches
        else:
            val_counts = count_tokens(val_source, self.tokenizer) if separate_val else train_counts
            val_batches = None
        self.train_set = PackedStream(
            train_source, keep=keep_train, counts=train_counts, batches_per_epoch=self.batches_per_epoch,
            shuffle=shuffle, shuffle_buffer=self.shuffle_buffer, split_name="training", **common,
        )  # fmt: skip
        self.val_set = PackedStream(
            val_source, keep=keep_val, counts=val_counts, batches_per_epoch=val_batches,
            shuffle=False, split_name="validation", **common,
        )  # fmt: skip

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "drop_last": True,
            "num_workers": self.num_workers,
            # Persistent workers keep their dataset copy, which counts epochs for the shuffle order.
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
