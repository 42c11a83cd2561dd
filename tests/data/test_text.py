import pytest
import torch

from mgqa.data import ByteTokenizer, PackedWindows, pack, read_documents, resolve_files, split_documents
from mgqa.data.tokenizer import build_tokenizer
from mgqa.lit.datamodule import TextDataModule


def test_byte_tokenizer_round_trip_and_vocab():
    tok = ByteTokenizer()
    text = "To be, or not to be — ça va?\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_tensor(text).tolist() == tok.encode(text)
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode([72, 105, 256, 0xFF]) == "Hi\ufffd"  # special token dropped, bad byte replaced
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        build_tokenizer("sentencepiece")


def test_packing_covers_every_token_once_as_a_target():
    tok = ByteTokenizer()
    docs = ["abcdefg", "hij", "klmnopqrstu"]
    stream = pack(docs, tok)
    assert stream.tolist() == tok.encode("abcdefg") + [256] + tok.encode("hij") + [256] + tok.encode("klmnopqrstu") + [256]
    windows = PackedWindows(stream, seq_len=4)
    targets = torch.cat([windows[i][1] for i in range(len(windows))])
    assert targets.tolist() == stream[1 : 1 + len(targets)].tolist()
    x, y = windows[1]
    assert torch.equal(x[1:], y[:-1])
    assert len(stream) - 1 - len(targets) < 4  # only a tail shorter than one window is dropped


def test_document_split_is_disjoint_deterministic_and_nonempty():
    docs = [f"doc {i}" for i in range(42)]
    train, val = split_documents(docs, 0.05, seed=3)
    assert len(val) == 2 and len(train) == 40 and not set(train) & set(val)
    assert split_documents(docs, 0.05, seed=3) == (train, val)
    assert split_documents(docs, 0.05, seed=4)[1] != val
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_documents(docs, 0.0, seed=0)
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["only"], 0.5, seed=0)


def test_embedded_corpus_is_present_and_clean():
    files = resolve_files("data/shakespeare/*.txt")
    assert len(files) == 42
    docs = read_documents(files)
    text = "".join(docs)
    assert len(text) > 4_000_000
    assert "Gutenberg" not in text and "To be, or not to be" in text


def test_missing_files_and_non_utf8_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        resolve_files(str(tmp_path / "nothing-here" / "*.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        read_documents([bad])


def test_datamodule_batches_and_too_small_corpus(tmp_path):
    for i in range(3):
        (tmp_path / f"d{i}.txt").write_text("hello world " * 50)
    dm = TextDataModule(files=str(tmp_path / "*.txt"), seq_len=16, batch_size=4, val_fraction=0.3, seed=0)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    small = TextDataModule(files=str(tmp_path / "*.txt"), seq_len=16, batch_size=500, val_fraction=0.3)
    with pytest.raises(ValueError, match="fewer than data.batch_size=500"):
        small.setup()
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer, got 0"):
        TextDataModule(files="x", seq_len=16, batch_size=0)
