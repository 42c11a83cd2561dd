"""Streamed documents -> tokens -> packed windows, sharded over DDP ranks and dataloader workers.

Every reader ("consumer": one dataloader worker of one rank, ``world_size * num_workers`` in all)
yields the same number of windows per epoch, so all ranks run the same number of steps and DDP
never waits on a rank that ran dry. Two ways to get there:

* **counted** (``batches_per_epoch=None``, the default): one pass at set-up counts the tokens of
  every document. An epoch is one token stream (shards in a seeded order that changes every
  epoch, each document followed by end-of-text); it is cut into ``C`` equal, contiguous ranges of
  ``n`` windows, ``n`` a multiple of the batch size. A consumer reads only the shards overlapping
  its range and tokenizes only the documents in it. Every token of the split is a training target
  exactly once per epoch, except a tail of fewer than ``C * (batch_size + 1)`` windows that cannot
  fill a batch on every consumer (it changes with the epoch's order).
* **fixed** (``batches_per_epoch=K``): no counting pass, for corpora too large to read at set-up
  (hub datasets). Consumers take disjoint shards (or every C-th document when there are fewer
  shards than consumers); each yields exactly ``K / num_workers`` batches, and one whose share
  runs out first starts another pass over the data in a new order.

Windows hold ``seq_len + 1`` tokens with stride ``seq_len`` (inputs and shifted targets), no padding.
Within a consumer, windows are shuffled in blocks of ``shuffle_buffer``: each block is read whole and
yielded in a seeded order of its own. The position (``epoch``, windows yielded) is the state for
exact resume, and the block structure makes it cheap: a resume rebuilds only the block it stopped
in. Counted mode finds that block's first window by the token counts; fixed mode saves, with the
position, the document where the current block starts (shard, document, token offset). Either way
shards before it are not read and the documents before it in its shard are read but not tokenized.
A fixed-mode state without that document position re-reads the epoch up to the block, and the log
says how long it took.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
import zlib
from typing import Callable, Iterator, Optional, Sequence

import torch

from mgqa.data.readers import ReaderShares
from mgqa.data.sources import DataError, DocumentSource

log = logging.getLogger("mgqa")

# (shard, index of the document in its shard) -> does this split keep it?
DocFilter = Callable[[int, int], bool]


def _keep_all(shard: int, j: int) -> bool:
    return True
ENCODE_BATCH = 64  # documents per tokenizer call (the Rust tokenizers parallelise within a call)


def count_tokens(source: DocumentSource, tokenizer) -> list[list[int]]:
    """Tokens of every document, per shard (without end-of-text). One full pass over the source."""
    counts = []
    for shard in range(source.num_shards):
        shard_counts: list[int] = []
        batch: list[str] = []
        for text in source.documents(shard):
            batch.append(text)
            if len(batch) == ENCODE_BATCH:
                shard_counts.extend(tokenizer.count_batch(batch))
                batch = []
        if batch:
            shard_counts.extend(tokenizer.count_batch(batch))
        counts.append(shard_counts)
    return counts


class HeldOut:
    """A picklable document filter (it travels to dataloader workers): documents in ``keys``, or, with
    ``fraction``, each document with that probability by a hash of its position and ``seed``.
    ``invert=True`` selects the other documents (the training side)."""

    def __init__(self, keys: Optional[set] = None, fraction: Optional[float] = None, seed: int = 0, invert: bool = False):
        self.keys, self.seed, self.invert = keys, seed, invert
        self.threshold = None if fraction is None else int(fraction * 2**32)

    def __call__(self, shard: int, j: int) -> bool:
        if self.threshold is not None:
            held = zlib.crc32(f"{self.seed}:{shard}:{j}".encode()) < self.threshold
        else:
            held = (shard, j) in self.keys
        return held != self.invert

    def complement(self) -> "HeldOut":
        other = HeldOut(self.keys, None, self.seed, not self.invert)
        other.threshold = self.threshold
        return other


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")


def holdout_by_count(counts: Sequence[Sequence[int]], val_fraction: float, seed: int) -> HeldOut:
    """``max(1, round(n * val_fraction))`` of the ``n`` non-empty documents, chosen by ``seed``."""
    _check_fraction(val_fraction)
    keys = [(s, j) for s, shard in enumerate(counts) for j, n in enumerate(shard) if n > 0]
    if len(keys) < 2:
        raise DataError(f"need at least 2 non-empty documents to hold one out for validation, got {len(keys)}")
    random.Random(seed).shuffle(keys)
    return HeldOut(keys=set(keys[: max(1, round(len(keys) * val_fraction))]))


def holdout_by_hash(val_fraction: float, seed: int) -> HeldOut:
    """Hold out each document with probability ``val_fraction``, decided by a hash of its position
    (no counting pass needed; the same documents on every rank and every run)."""
    _check_fraction(val_fraction)
    return HeldOut(fraction=val_fraction, seed=seed)


def _cut_windows(chunks: Iterator[torch.Tensor], seq_len: int) -> Iterator[torch.Tensor]:
    """Consecutive (seq_len + 1)-token windows with stride seq_len over the concatenated chunks."""
    pending: list[torch.Tensor] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += chunk.numel()
        if size < seq_len + 1:
            continue
        stream = torch.cat(pending)
        n = (stream.numel() - 1) // seq_len
        for k in range(n):
            yield stream[k * seq_len : k * seq_len + seq_len + 1]
        tail = stream[n * seq_len :]  # the last target of one window is the first input of the next
        pending, size = [tail], tail.numel()


class PackedStream(ReaderShares):
    """Packed ``(inputs, targets)`` windows, each (seq_len,) int64, of one split of ``source``.

    ``keep(shard, j)`` selects this split's documents. Pass ``counts`` (from ``count_tokens``) for
    the counted mode or ``batches_per_epoch`` for the fixed mode (module docstring). ``rank`` and
    ``world_size`` place this process among the DDP ranks; ``num_workers`` must match the
    DataLoader's. ``len()`` is the number of windows per epoch of this rank.
    """

    def __init__(
        self,
        source: DocumentSource,
        tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        keep: Optional[DocFilter] = None,
        counts: Optional[Sequence[Sequence[int]]] = None,
        batches_per_epoch: Optional[int] = None,
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        split_name: str = "train",
    ) -> None:
        if (counts is None) == (batches_per_epoch is None):
            raise ValueError("give exactly one of counts (counted epochs) or batches_per_epoch (fixed epochs)")
        self._place(rank, world_size, num_workers)
        self.source, self.tokenizer, self.split_name = source, tokenizer, split_name
        self.seq_len, self.batch_size = seq_len, batch_size
        self.keep = keep or _keep_all
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, max(1, shuffle_buffer), seed
        if counts is not None:
            # Tokens each kept document adds to the stream: its text and an end-of-text token.
            self.doc_tokens = [
                [n + 1 if n > 0 and self.keep(s, j) else 0 for j, n in enumerate(shard)] for s, shard in enumerate(counts)
            ]
            self.shard_tokens = [sum(shard) for shard in self.doc_tokens]
            total_windows = max(0, sum(self.shard_tokens) - 1) // seq_len
            self.windows_per_consumer = self._even_share(total_windows, batch_size, split_name, seq_len, "add text")
        else:
            if not isinstance(batches_per_epoch, int) or batches_per_epoch < self.workers:
                raise DataError(
                    f"data.batches_per_epoch must be an integer >= num_workers ({self.workers}), got {batches_per_epoch!r}"
                )
            self.doc_tokens = None
            self.windows_per_consumer = batches_per_epoch // self.workers * batch_size
        self._next_epoch = 0
        self._resume: Optional[tuple[int, int, Optional[dict]]] = None
        self._epoch, self._yielded = 0, 0
        self._origin: Optional[dict] = None  # fixed mode: where the current shuffle block starts

    def __len__(self) -> int:
        return self.windows_per_consumer * self.workers

    # -- position, saved by StatefulDataLoader once per worker -------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "yielded": self._yielded, "origin": self._origin}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["yielded"]), state.get("origin"))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        consumer = self._consumer()
        origin = None
        if self._resume is not None:
            epoch, skip, origin = self._resume
            self._resume = None
            if skip >= self.windows_per_consumer:  # saved at the end of an epoch
                epoch, skip, origin = epoch + 1, 0, None
        else:
            epoch, skip = self._next_epoch, 0
        self._next_epoch = epoch + 1
        self._epoch, self._yielded, self._origin = epoch, skip, None
        block = self.shuffle_buffer if self.shuffle else 1
        fixed = self.doc_tokens is None
        if fixed and origin is not None:  # the saved block's first document: no replay
            first_block = int(origin["block"])
            offset = skip - first_block * block
        else:
            first_block, offset = divmod(skip, block)
        replayed = fixed and skip > 0 and origin is None
        started = time.perf_counter()
        recent: list[dict] = []  # fixed mode: where each document read starts (to save block origins)
        windows = self._windows(epoch, consumer, first_block * block, origin if fixed else None, recent)
        for b in itertools.count(first_block):
            if self._yielded >= self.windows_per_consumer:
                return
            chunk = [w.to(torch.int32) for w in itertools.islice(windows, block)]  # half the memory of int64
            if not chunk:
                return
            if fixed:
                self._origin = self._block_origin(recent, b, b * block * self.seq_len)
            if skip:
                log.info(
                    "%s reader %d resumed at window %d of epoch %d in %.2fs%s", self.split_name, consumer, skip, epoch,
                    time.perf_counter() - started, " (re-read and re-tokenized up to it: a checkpoint without "
                    "document positions)" if replayed else "",
                )  # fmt: skip
                skip = 0
            order = list(range(len(chunk)))
            if self.shuffle:
                random.Random(f"{self.seed}/{epoch}/consumer{consumer}/block{b}").shuffle(order)
            for i in order[offset:]:
                if self._yielded >= self.windows_per_consumer:
                    return
                self._yielded += 1
                window = chunk[i].long()
                yield window[:-1], window[1:]  # (N,), (N,)
            offset = 0

    # -- the deterministic stream of one consumer in one epoch -------------------------------
    def _order(self, epoch: int, rerun: int = 0) -> list[int]:
        order = list(range(self.source.num_shards))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/{rerun}").shuffle(order)
        return order

    @staticmethod
    def _block_origin(recent: list[dict], block: int, token: int) -> dict:
        """The saved position of a block: the document holding its first token, and where in it."""
        k = max(i for i, doc in enumerate(recent) if doc["doc_abs"] <= token)
        del recent[:k]  # earlier documents are behind every later block
        return {**recent[0], "block": block, "skip_tokens": token - recent[0]["doc_abs"]}

    def _windows(
        self, epoch: int, consumer: int, first: int = 0, origin: Optional[dict] = None, recent: Optional[list] = None
    ) -> Iterator[torch.Tensor]:
        """This consumer's windows in stream order, from its ``first``-th window (fixed mode: from
        ``origin``, the saved position of that window's block, else by re-reading up to it)."""
        if self.doc_tokens is not None:
            return _cut_windows(self._range_tokens(epoch, consumer, first), self.seq_len)
        if origin is not None:
            return _cut_windows(self._cycled_tokens(epoch, consumer, origin, recent), self.seq_len)
        return itertools.islice(_cut_windows(self._cycled_tokens(epoch, consumer, None, recent), self.seq_len), first, None)

    def _encode(self, texts: list[str]) -> Iterator[torch.Tensor]:
        eot = torch.tensor([self.tokenizer.eot_id], dtype=torch.long)
        for tokens in self.tokenizer.encode_batch(texts):
            yield torch.cat((tokens, eot))

    def _range_tokens(self, epoch: int, consumer: int, first: int = 0) -> Iterator[torch.Tensor]:
        """Counted mode: exactly the tokens [start, start + n * seq_len + 1) of the epoch's stream,
        from the ``first``-th window of the range on."""
        start = consumer * self.windows_per_consumer * self.seq_len
        end = start + self.windows_per_consumer * self.seq_len + 1
        start += first * self.seq_len
        offset = 0
        for shard in self._order(epoch):
            if offset + self.shard_tokens[shard] <= start:
                offset += self.shard_tokens[shard]  # before this consumer's range: not even read
                continue
            if offset >= end:
                return
            lengths = self.doc_tokens[shard]
            texts: list[str] = []
            spans: list[tuple[int, int]] = []  # the part of each document inside the range
            for j, text in enumerate(self.source.documents(shard)):
                if j >= len(lengths):
                    raise RuntimeError(f"{self.source.names[shard]} changed since its tokens were counted")
                n = lengths[j]
                lo, hi = max(start - offset, 0), min(end - offset, n)
                offset += n
                if n and lo < hi:
                    texts.append(text)
                    spans.append((lo, hi))
                if len(texts) == ENCODE_BATCH or offset >= end:
                    for tokens, (a, b) in zip(self._encode(texts), spans):
                        yield tokens[a:b]
                    texts, spans = [], []
                if offset >= end:
                    return
            for tokens, (a, b) in zip(self._encode(texts), spans):
                yield tokens[a:b]

    def _cycled_tokens(
        self, epoch: int, consumer: int, origin: Optional[dict] = None, recent: Optional[list] = None
    ) -> Iterator[torch.Tensor]:
        """Fixed mode: this consumer's shards (or every C-th document) in passes of new orders.

        Each document's position is appended to ``recent``; ``origin`` (one such position, with
        ``skip_tokens``) starts the stream inside that document: earlier documents of its shard are
        read but not tokenized, earlier shards not read."""
        by_shard = self.source.num_shards >= self.consumers
        pos = origin["doc_abs"] if origin else 0  # tokens of the epoch's stream before the next document
        skip = origin["skip_tokens"] if origin else 0
        for rerun in itertools.count(origin["rerun"] if origin else 0):
            order = self._order(epoch, rerun)
            shards = order[consumer :: self.consumers] if by_shard else order
            here = origin is not None and rerun == origin["rerun"]
            produced, seen = (origin["produced"], origin["seen"]) if here else (0, 0)
            texts, docs = [], []

            def emit() -> Iterator[torch.Tensor]:
                nonlocal pos, produced, skip
                for tokens, doc in zip(self._encode(texts), docs):
                    if recent is not None:
                        recent.append({**doc, "produced": produced, "doc_abs": pos})
                    produced += tokens.numel()
                    pos += tokens.numel()
                    yield tokens[skip:] if skip else tokens
                    skip = 0
                texts.clear()
                docs.clear()

            for i in range(origin["shard"] if here else 0, len(shards)):
                shard = shards[i]
                for j, text in enumerate(self.source.documents(shard)):
                    if here and i == origin["shard"] and j < origin["doc"]:
                        continue
                    if not text or not self.keep(shard, j):
                        continue
                    seen += 1
                    if not by_shard and (seen - 1) % self.consumers != consumer:
                        continue
                    texts.append(text)
                    docs.append({"rerun": rerun, "shard": i, "doc": j, "seen": seen - 1})
                    if len(texts) == ENCODE_BATCH:
                        yield from emit()
            yield from emit()
            if produced == 0:
                raise DataError(
                    f"reader {consumer} of {self.consumers} found no {self.split_name} text in a full pass over "
                    f"{self.source.num_shards} shard(s); the split is empty or has fewer documents than readers "
                    "(for a held-out fraction: raise data.val_fraction)"
                )
