"""Small corpora written to tmp_path, and a helper that drains a split the way a DDP rank would."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from mgqa.data import ByteTokenizer, DocumentSource, PackedStream, count_tokens


def write_docs(directory, docs, suffix=".txt"):
    """One file per document (zero-padded names keep the sorted order)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc{i:03d}{suffix}").write_text(doc, encoding="utf-8")
    return str(directory / f"*{suffix}")


def corpus_counter(docs, tokenizer=None):
    """Every token of the packed corpus (documents and their end-of-text tokens)."""
    tokenizer = tokenizer or ByteTokenizer()
    counter = Counter()
    for doc in docs:
        if doc:
            counter.update(tokenizer.encode(doc) + [tokenizer.eot_id])
    return counter


def rank_stream(files, rank, world_size, num_workers, *, epoch_runs=1, **kwargs):
    """The batches one rank sees in ``epoch_runs`` epochs, through a real DataLoader with workers."""
    kwargs.setdefault("seq_len", 8)
    kwargs.setdefault("batch_size", 2)
    source = DocumentSource(files=files)
    tokenizer = ByteTokenizer()
    if "batches_per_epoch" not in kwargs:
        kwargs["counts"] = count_tokens(source, tokenizer)
    dataset = PackedStream(source, tokenizer, rank=rank, world_size=world_size, num_workers=num_workers, **kwargs)
    loader = DataLoader(
        dataset, batch_size=kwargs["batch_size"], num_workers=num_workers, persistent_workers=num_workers > 0, drop_last=True
    )
    epochs = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(epoch_runs)]
    return dataset, loader, epochs


def targets_counter(batches):
    counter = Counter()
    for _, y in batches:
        counter.update(y.flatten().tolist())
    return counter


@pytest.fixture
def varied_docs():
    """Documents of very different lengths, all characters distinct per document position."""
    words = ["alpha ", "beta ", "gamma ", "delta ", "epsilon ", "zeta "]
    return [("".join(words[(i + k) % 6] for k in range(n)) + f"#{i}\n") for i, n in enumerate([3, 40, 7, 90, 1, 25, 60, 12, 5, 33])]


def assert_equal_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
