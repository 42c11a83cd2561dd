"""What the training datasets share: each split is read by ``world_size x num_workers`` readers
(DDP ranks times DataLoader workers), each taking its own equal share of an epoch's windows."""

from __future__ import annotations

from torch.utils.data import IterableDataset, get_worker_info

from mgqa.data.sources import DataError


class ReaderShares(IterableDataset):
    """Base of ``PackedStream`` and ``TokenWindows``: this process's place among the readers."""

    def _place(self, rank: int, world_size: int, num_workers: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, num_workers)
        self.consumers = world_size * self.workers

    def _even_share(self, windows: int, batch_size: int, split_name: str, seq_len: int, remedy: str) -> int:
        """Windows per reader: an equal share of ``windows``, a whole number of batches, so that every
        rank runs the same number of steps; an error naming the numbers if that is not one batch."""
        share = windows // self.consumers // batch_size * batch_size
        if share == 0:
            raise DataError(
                f"the {split_name} split has {windows} windows of {seq_len} tokens, fewer than one batch "
                f"for each of {self.consumers} readers (world_size {self.world_size} x workers {self.workers} x "
                f"data.batch_size {batch_size} = {self.consumers * batch_size}); lower the batch size, seq_len "
                f"or workers, or {remedy}"
            )
        return share

    def _consumer(self) -> int:
        """This reader's number: rank x workers + the DataLoader worker's id."""
        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"dataset built for {self.workers} workers runs under {info.num_workers}")
        return self.rank * self.workers + (info.id if info is not None else 0)
