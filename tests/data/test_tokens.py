"""TokenWindows and data=tokens: a seeded permutation of windows split evenly over ranks and workers,
constant-time exact resume, and the checks on a prepared directory."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from mgqa.data.prepare import compose_config, prepare
from mgqa.data.shards import open_shards
from mgqa.data.tokens import TokenWindows, permute
from mgqa.lit.tokens_datamodule import TokenDataModule
from mgqa.model.config import ConfigError
from tests.data.conftest import write_docs

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:.*set_vital")]
SEQ, BATCH = 8, 2


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    docs = [f"text {i} " + "".join(chr(97 + (i * 3 + k) % 26) for k in range(40 + 23 * i)) for i in range(14)]
    files = write_docs(root / "docs", docs)
    cfg = compose_config([f"data.files={files}", f"out={root / 'tok'}", "shard_tokens=300", "data.val_fraction=0.15"])
    return prepare(cfg, print_fn=lambda *_: None, progress=False)


def loader(out, rank=0, world=1, workers=0, seed=3):
    dataset = TokenWindows(open_shards(out, "train"), SEQ, BATCH, seed=seed, rank=rank, world_size=world, num_workers=workers)
    return StatefulDataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)


def window_keys(batches):
    return Counter(tuple(torch.cat((x[r], y[r, -1:])).tolist()) for x, y in batches for r in range(x.shape[0]))


def test_permute_is_a_seeded_bijection():
    for size in (1, 2, 3, 31, 1000, 4097):
        assert sorted(permute(np.arange(size), size, 5).tolist()) == list(range(size))
    a, b = permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    far = 10**12 - 7  # any position of a huge permutation, computed directly
    assert 0 <= permute(np.array([far]), 10**12, 1)[0] < 10**12


def test_windows_are_consecutive_slices_of_the_shards(prepared):
    shards = open_shards(prepared, "train")
    dataset = TokenWindows(shards, SEQ, BATCH, shuffle=False)
    x, y = next(iter(dataset))
    first = np.asarray(shards[0].tokens[: 2 * SEQ + 1]).astype(np.int64)
    assert x.dtype == torch.int64 and x.shape == (BATCH, SEQ)
    assert x[0].tolist() == first[:SEQ].tolist() and y[0].tolist() == first[1 : SEQ + 1].tolist()
    assert x[1].tolist() == first[SEQ : 2 * SEQ].tolist()  # stride seq_len: the last target starts the next window
    assert dataset.num_windows == sum((s.num_tokens - 1) // SEQ for s in shards)


def test_two_ranks_two_workers_read_each_window_at_most_once_and_equally(prepared):
    every = window_keys(TokenWindows(open_shards(prepared, "train"), SEQ, BATCH, shuffle=False))
    seen, lengths = Counter(), []
    for rank in range(2):
        batches = list(loader(prepared, rank, 2, 2))
        lengths.append(len(batches))
        seen += window_keys(batches)
    assert lengths[0] == lengths[1] == len(loader(prepared, 0, 2, 2))
    assert not seen - every  # nothing twice, nothing invented
    assert sum((every - seen).values()) < 2 * 2 * BATCH  # a tail shorter than a batch per reader


def test_the_order_is_seeded_and_new_every_epoch(prepared):
    first = loader(prepared, seed=3)
    one, two = list(first), list(first)
    again = list(loader(prepared, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, two))
    assert window_keys(one) == window_keys(two)  # the same windows in another order


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_at_the_exact_next_batch(prepared, workers):
    reference = loader(prepared, workers=workers)
    flat = list(reference) + list(reference)
    per_epoch = len(flat) // 2
    for stop in (3, per_epoch):  # mid-epoch, and exactly at the end of an epoch
        interrupted = loader(prepared, workers=workers)
        it = iter(interrupted)
        for _ in range(stop):
            next(it)
        state = interrupted.state_dict()
        del it
        resumed = loader(prepared, workers=workers)
        resumed.load_state_dict(state)
        rest = list(resumed) or list(resumed)  # at an epoch end the next epoch starts
        assert len(rest) >= 2
        for (xa, ya), (xb, yb) in zip(rest[:4], flat[stop : stop + 4]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def _module(out, **kwargs):
    return TokenDataModule(dir=str(out), seq_len=SEQ, batch_size=BATCH, **kwargs)


def test_datamodule_batches_and_validation_split(prepared):
    dm = _module(prepared, num_workers=0)
    dm.check_files()
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (BATCH, SEQ)
    val = list(dm.val_dataloader())
    assert len(val) == len(dm.val_set) > 0


def test_bad_directories_are_named(prepared, tmp_path):
    import shutil

    def broken(name, change):
        copy = tmp_path / name
        shutil.copytree(prepared, copy)
        change(copy)
        return copy

    cases = [
        (tmp_path / "nowhere", FileNotFoundError, "does not exist"),
        (broken("missing", lambda d: (d / "train_00001.bin").unlink()), FileNotFoundError, "train_00001.bin is missing"),
        (broken("short", lambda d: (d / "train_00002.bin").write_bytes((d / "train_00002.bin").read_bytes()[:-10])),
         ConfigError, r"train_00002.bin is truncated: 590 bytes, the manifest says 300 uint16 tokens = 600 bytes"),
        (broken("unfinished", lambda d: (d / "manifest.json").unlink()), FileNotFoundError, "unfinished preparation"),
        (broken("other", lambda d: (d / "manifest.json").write_text(
            json.dumps(json.loads((d / "manifest.json").read_text()) | {"tokenizer": {"spec": "gpt2", "hash": "sha256:0123"}}))),
         ConfigError, r"tokenized by 'gpt2' \(sha256:0123\), this run uses 'byte' \(sha256:[0-9a-f]{16}\)"),
    ]  # fmt: skip
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            _module(path).check_files()
    with pytest.raises(ConfigError, match="data.dir is required"):
        TokenDataModule(dir=None, seq_len=SEQ, batch_size=BATCH).check_files()
    with pytest.raises(ConfigError, match="fewer than one batch for each of 2 readers"):
        dm = _module(prepared, num_workers=2)
        dm.seq_len = 4096
        dm.setup()


def test_overfit_reads_the_same_training_windows_every_epoch(prepared):
    class Trainer:  # what setup() reads of Lightning's trainer
        global_rank, world_size, overfit_batches = 0, 1, 2

    def two_epochs(overfit_batches):
        dm = _module(prepared)
        dm.trainer = type("T", (Trainer,), {"overfit_batches": overfit_batches})()
        dm.check_files()
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [[x for x, _ in loader][:2] for _epoch in range(2)]

    first, second = two_epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    first, second = two_epochs(0)  # shuffled otherwise: another order each epoch
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
