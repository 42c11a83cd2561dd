"""The streaming path resumes without replaying the epoch: it rebuilds only the shuffle block it
stopped in, found by the token counts (counted mode) or by the saved document position (fixed mode)."""

import logging

import pytest
import torch

from mgqa.data import ByteTokenizer, DocumentSource, PackedStream, count_tokens
from tests.data.conftest import write_docs

pytestmark = pytest.mark.timeout(120)


class CountingTokenizer(ByteTokenizer):
    """The byte tokenizer, counting the characters it is asked to encode."""

    def __init__(self) -> None:
        super().__init__()
        self.encoded = 0

    def encode_batch(self, texts):
        self.encoded += sum(len(t) for t in texts)
        return super().encode_batch(texts)


def stream(files, tokenizer, **kwargs):
    source = DocumentSource(files=files)
    counts = None if "batches_per_epoch" in kwargs else count_tokens(source, ByteTokenizer())
    return PackedStream(source, tokenizer, seq_len=8, batch_size=2, counts=counts, seed=5, shuffle_buffer=16, **kwargs)


def test_a_late_counted_resume_tokenizes_one_block_not_the_epoch(tmp_path, caplog):
    docs = [f"doc {i} " + "".join(chr(97 + (i * 11 + k) % 26) for k in range(120)) for i in range(30)]
    files = write_docs(tmp_path, docs)
    full_tokenizer = CountingTokenizer()
    reference = list(stream(files, full_tokenizer))
    skip = len(reference) - 20  # in the last blocks of the epoch
    tokenizer = CountingTokenizer()
    resumed = stream(files, tokenizer)
    resumed.load_state_dict({"epoch": 0, "yielded": skip})
    with caplog.at_level(logging.INFO, logger="mgqa"):
        rest = list(resumed)
    assert len(rest) == 20 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, reference[skip:]))
    assert tokenizer.encoded < full_tokenizer.encoded / 5  # about one block (16 windows) of 3.8k tokens, not the epoch
    assert f"resumed at window {skip} of epoch 0" in caplog.text and "re-tokenized" not in caplog.text


def test_a_fixed_mode_resume_starts_at_the_saved_document(tmp_path, caplog):
    docs = [f"document {i} " + "".join(chr(97 + (i * 7 + k) % 26) for k in range(150)) for i in range(12)]
    files = write_docs(tmp_path, docs)
    full_tokenizer = CountingTokenizer()
    reference = list(stream(files, full_tokenizer, batches_per_epoch=200))
    assert len(reference) == 400  # more than one pass over the 12 documents: the reader cycles
    interrupted = stream(files, ByteTokenizer(), batches_per_epoch=200)
    it = iter(interrupted)
    for _ in range(381):
        next(it)
    state = interrupted.state_dict()
    assert state["origin"]["rerun"] > 0  # the saved block starts in a later pass
    tokenizer = CountingTokenizer()
    resumed = stream(files, tokenizer, batches_per_epoch=200)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.INFO, logger="mgqa"):
        rest = list(resumed)
    assert len(rest) == 19 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, reference[381:]))
    assert tokenizer.encoded < full_tokenizer.encoded / 3  # a block and a document, not the passes before
    assert "resumed at window 381 of epoch 0" in caplog.text and "re-tokenized" not in caplog.text

    caplog.clear()
    replay = stream(files, ByteTokenizer(), batches_per_epoch=200)
    replay.load_state_dict({"epoch": 0, "yielded": 381})  # no document position: the epoch is replayed
    with caplog.at_level(logging.INFO, logger="mgqa"):
        again = list(replay)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, reference[381:])) and len(again) == 19
    assert "resumed at window 381 of epoch 0 in" in caplog.text and "re-tokenized up to it" in caplog.text
