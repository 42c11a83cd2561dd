"""Packing, sharding over ranks x workers, balance, shuffling and exact resume of PackedStream."""

from collections import Counter

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mgqa.data import ByteTokenizer, DocumentSource, PackedStream, count_tokens
from tests.data.conftest import assert_equal_batches, corpus_counter, rank_stream, targets_counter, write_docs

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:.*set_vital")]


def test_windows_pack_documents_with_end_of_text_and_no_padding(tmp_path):
    docs = ["abcdefg", "", "hij", "klmnopqrstuvwxyz0123456789" * 3]
    files = write_docs(tmp_path, docs)
    dataset, _, (batches,) = rank_stream(files, 0, 1, 0, shuffle=False, seq_len=4, batch_size=1)
    tok = ByteTokenizer()
    stream = tok.encode("abcdefg") + [256] + tok.encode("hij") + [256] + tok.encode(docs[3]) + [256]  # empty doc skipped
    windows = [torch.cat((x[0], y[0, -1:])).tolist() for x, y in batches]
    assert windows == [stream[k * 4 : k * 4 + 5] for k in range(len(windows))]
    assert len(windows) == (len(stream) - 1) // 4 == len(dataset)  # only a tail shorter than a window is left
    x, y = batches[1]
    assert torch.equal(x[0, 1:], y[0, :-1])


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_two_workers_see_every_token_exactly_once(tmp_path, shuffle):
    # 4 readers x batch 2 x seq_len 8 = 64 tokens per round: pad the corpus to 64k + 1 tokens so nothing is dropped.
    docs = [f"document {i} " * (i + 1) for i in range(9)]
    total = sum(corpus_counter(docs).values())
    docs.append("z" * ((-(total - 1)) % 64 - 1 + 64))
    files = write_docs(tmp_path, docs)
    corpus = corpus_counter(docs)
    assert (sum(corpus.values()) - 1) % 64 == 0
    seen = Counter()
    lengths = []
    for rank in range(2):
        dataset, loader, (batches,) = rank_stream(files, rank, 2, 2, shuffle=shuffle, shuffle_buffer=5)
        assert len(batches) == len(loader)
        lengths.append(len(batches))
        seen += targets_counter(batches)
    assert lengths[0] == lengths[1]
    missing = corpus - seen
    assert not seen - corpus  # nothing twice
    assert sum(missing.values()) == 1  # only the first token of the epoch's stream is never a target


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path, varied_docs):
    files = write_docs(tmp_path, varied_docs)
    corpus = corpus_counter(varied_docs)
    seen = Counter()
    per_rank = []
    for rank in range(2):
        _, loader, epochs = rank_stream(files, rank, 2, 2, epoch_runs=2)
        per_rank.append([len(batches) for batches in epochs] + [len(loader)])
        seen += targets_counter(epochs[0])
    assert per_rank[0] == per_rank[1] and per_rank[0][0] > 0
    assert not seen - corpus  # no token of the first epoch seen twice across ranks and workers
    dropped = sum((corpus - seen).values())
    assert dropped < 2 * 2 * (2 + 1) * 8 + 1  # less than one batch (+1 window) per reader


def test_fixed_epochs_balance_without_counting_and_cycle_short_shards(tmp_path, varied_docs):
    files = write_docs(tmp_path, varied_docs[:5])  # 5 shards over 4 readers: one reader gets two
    lengths = []
    for rank in range(2):
        _, loader, (batches,) = rank_stream(files, rank, 2, 2, batches_per_epoch=40)
        lengths.append((len(loader), len(batches)))
    assert lengths == [(40, 40), (40, 40)]  # more than the shortest reader's share: it starts another pass


def test_shuffle_is_seeded_reproducible_and_new_every_epoch(tmp_path, varied_docs):
    files = write_docs(tmp_path, varied_docs)
    _, _, (first, second) = rank_stream(files, 0, 1, 0, epoch_runs=2, seed=7)
    _, _, (again,) = rank_stream(files, 0, 1, 0, epoch_runs=1, seed=7)
    _, _, (other_seed,) = rank_stream(files, 0, 1, 0, epoch_runs=1, seed=8)
    assert_equal_batches(first, again)
    a, b = targets_counter(first), targets_counter(second)
    assert len(first) == len(second) and sum(((a - b) + (b - a)).values()) < 2 * 3 * 8  # the same corpus up to the tail ...
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second))  # ... in a new order
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_seed))


def _stateful(files, num_workers, **kwargs):
    source = DocumentSource(files=files)
    tok = ByteTokenizer()
    dataset = PackedStream(
        source, tok, seq_len=8, batch_size=2, counts=count_tokens(source, tok), num_workers=num_workers, seed=3,
        shuffle_buffer=7, **kwargs,
    )  # fmt: skip
    return StatefulDataLoader(dataset, batch_size=2, num_workers=num_workers, persistent_workers=num_workers > 0, drop_last=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resumes_at_the_exact_next_batch(tmp_path, varied_docs, num_workers):
    files = write_docs(tmp_path, varied_docs)
    loader = _stateful(files, num_workers)
    per_epoch = len(loader)
    reference = [list(loader) for _ in range(2)]
    flat = reference[0] + reference[1]
    for stop in (5, per_epoch):  # mid-epoch, and exactly at the end of an epoch
        loader = _stateful(files, num_workers)
        it = iter(loader)
        for _ in range(stop):
            next(it)
        state = loader.state_dict()
        del it
        resumed = _stateful(files, num_workers)
        resumed.load_state_dict(state)
        rest = list(resumed)
        if stop == per_epoch:  # the finished epoch is not repeated: the next one starts
            rest = list(resumed) if not rest else rest
        assert_equal_batches(rest[:4], flat[stop : stop + 4])
