"""Training windows read by memory map from prepared token shards (``mgqa.data.shards``).

A shard of ``n`` tokens holds ``(n - 1) // seq_len`` windows of ``seq_len + 1`` tokens at stride
``seq_len`` (inputs and shifted targets, no padding); windows do not cross shard boundaries. The
split's ``W`` windows are numbered shard after shard. An epoch visits them in the order of a seeded
pseudo-random permutation of ``[0, W)`` that changes every epoch: a Feistel network computes the
``i``-th element directly, so the order needs no memory and any position is reached in constant time.

The epoch's order is cut into ``C`` equal contiguous ranges of ``n`` windows, one per reader (``C =
world_size * num_workers``, ``n`` a multiple of the batch size), so every rank runs the same
number of steps and every window is read at most once per epoch (a tail of fewer than ``C * batch``
windows is left out, a different one each epoch). A reader yields whole batches; its resume state
is ``(epoch, batches yielded)``.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from mgqa.data.readers import ReaderShares
from mgqa.data.shards import Shard

_ROUNDS = 4
_IDS_AHEAD = 256  # batches whose window numbers are computed together
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit hash (splitmix64's finaliser) of ``x`` and ``key``: the Feistel round function."""
    with np.errstate(over="ignore"):
        z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(positions: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The images of ``positions`` under a seeded bijection of ``[0, size)`` (int64 in, int64 out).

    A balanced Feistel network over the smallest even number of bits covering ``size`` is a
    bijection of ``[0, 4**half)``; walking the cycle until the value falls below ``size`` restricts
    it to a bijection of ``[0, size)`` (less than 4 steps on average, since ``4**half < 4 * size``).
    """
    if size <= 1:
        return np.zeros_like(positions, dtype=np.int64)
    half = max(1, (int(size - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    keys = [_mix(np.array([(seed * _ROUNDS + r) % 2**64], dtype=np.uint64), np.uint64(0x5EED))[0] for r in range(_ROUNDS)]

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & low
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & low)
        return (left << np.uint64(half)) | right

    out = feistel(positions.astype(np.uint64))
    outside = out >= np.uint64(size)
    while outside.any():
        out[outside] = feistel(out[outside])
        outside = out >= np.uint64(size)
    return out.astype(np.int64)


class TokenWindows(ReaderShares):
    """Batches ``(inputs, targets)``, each (batch_size, seq_len) int64, of windows from ``shards``.

    Use with ``DataLoader(batch_size=None)``: the dataset batches itself (one memory-mapped slice
    per window, no per-sample collation). ``rank``/``world_size`` place this process among the DDP
    ranks; ``num_workers`` must match the DataLoader's. ``len()`` is the batches per epoch of this rank.
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        seq_len: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        split_name: str = "train",
    ) -> None:
        self._place(rank, world_size, num_workers)
        self.shards = list(shards)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.shuffle, self.seed = shuffle, seed
        per_shard = [max(0, s.num_tokens - 1) // seq_len for s in self.shards]
        self.first_window = np.concatenate(([0], np.cumsum(per_shard))).astype(np.int64)  # of each shard
        self.num_windows = int(self.first_window[-1])
        self.windows_per_consumer = self._even_share(self.num_windows, batch_size, split_name, seq_len,
                                                     "prepare more text")
        self.batches_per_consumer = self.windows_per_consumer // batch_size
        self._next_epoch = 0
        self._resume: Optional[tuple[int, int]] = None
        self._epoch, self._yielded = 0, 0

    def __len__(self) -> int:
        return self.batches_per_consumer * self.workers

    # -- position, saved by StatefulDataLoader once per worker -------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["yielded"]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        consumer = self._consumer()
        if self._resume is not None:
            epoch, start = self._resume
            self._resume = None
            if start >= self.batches_per_consumer:  # saved at the end of an epoch
                epoch, start = epoch + 1, 0
        else:
            epoch, start = self._next_epoch, 0
        self._next_epoch = epoch + 1
        self._epoch, self._yielded = epoch, start
        for first in range(start, self.batches_per_consumer, _IDS_AHEAD):
            # Window numbers of many batches at once: the permutation's cost is per call, not per window.
            count = min(_IDS_AHEAD, self.batches_per_consumer - first)
            ids = self.window_ids(epoch, consumer, first, count).reshape(count, self.batch_size)
            for row in ids:
                windows = self.read(row)
                self._yielded += 1
                yield windows[:, :-1], windows[:, 1:]  # (B, N), (B, N)

    def window_ids(self, epoch: int, consumer: int, batch: int, count: int = 1) -> np.ndarray:
        """The split's window numbers of ``count`` batches of ``consumer`` in ``epoch`` from ``batch``
        on: (count * B,) int64."""
        first = consumer * self.windows_per_consumer + batch * self.batch_size
        positions = np.arange(first, first + count * self.batch_size, dtype=np.int64)
        if not self.shuffle:
            return positions
        return permute(positions, self.num_windows, self.seed * 1_000_003 + epoch)

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """The (len(ids), seq_len + 1) int64 windows ``ids``, read from the memory maps."""
        shard_of = np.searchsorted(self.first_window, ids, side="right") - 1
        starts = (ids - self.first_window[shard_of]) * self.seq_len
        span = self.seq_len + 1
        out = np.empty((len(ids), span), dtype=np.int64)
        for row, (s, start) in enumerate(zip(shard_of.tolist(), starts.tolist())):
            out[row] = self.shards[s].tokens[start : start + span]
        return torch.from_numpy(out)
