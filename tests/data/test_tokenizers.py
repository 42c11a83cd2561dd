"""Byte, trained BPE and tokenizer-directory tokenizers; model.num_tokens must cover the vocabulary."""

import pytest

from mgqa.data import ByteTokenizer, HFTokenizer, build_tokenizer
from mgqa.data.train_bpe import main as train_bpe_main
from mgqa.lit.run import resolve_model_config
from mgqa.model import ConfigError
from tests.conftest import TINY, compose

SHIPPED = "data/tokenizers/shakespeare-bpe-2k.json"
pytestmark = pytest.mark.timeout(120)


def test_byte_tokenizer_round_trip_and_vocab():
    tok = ByteTokenizer()
    text = "To be, or not to be — ça va?\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_tensor(text).tolist() == tok.encode(text)
    assert tok.count_batch([text, ""]) == [len(text.encode()), 0]
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode([72, 105, 256, 0xFF]) == "Hi\ufffd"  # special token dropped, bad byte replaced


def test_train_bpe_command_saves_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40 + f"doc {i}")
    out = tmp_path / "tok" / "bpe.json"
    train_bpe_main(["--files", str(corpus / "*.txt"), "--vocab-size", "300", "--out", str(out)])
    for spec in (str(out), str(out.parent)):  # the file, or a directory holding tokenizer.json
        if spec == str(out.parent):
            out.rename(out.parent / "tokenizer.json")
        tok = build_tokenizer(spec)
        assert isinstance(tok, HFTokenizer) and 257 < tok.vocab_size <= 300  # a tiny corpus runs out of merges
        text = "the lazy fox — naïve\n"
        assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
        assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
        assert tok.eot_token == "<|endoftext|>" and tok.eot_id == 0
    with pytest.raises(ValueError, match="no end-of-text token: tried \\['<eos>'\\]"):
        build_tokenizer(str(out.parent), eot_token="<eos>")
    with pytest.raises(FileNotFoundError, match="tokenizer file 'missing.json' does not exist"):
        build_tokenizer("missing.json")
    with pytest.raises(ValueError, match="--vocab-size must be at least 257"):
        train_bpe_main(["--files", str(corpus / "*.txt"), "--vocab-size", "100", "--out", str(out)])


def test_shipped_bpe_tokenizer_compresses_the_corpus():
    tok = build_tokenizer(SHIPPED)
    assert tok.vocab_size == 2048 and tok.eot_token == "<|endoftext|>"
    text = open("data/shakespeare/hamlet.txt", encoding="utf-8").read()[:20000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.5  # bytes per token


def test_num_tokens_is_derived_from_or_checked_against_the_tokenizer():
    assert resolve_model_config(compose(*TINY)).num_tokens == 257
    assert resolve_model_config(compose(*TINY, "data=shakespeare_bpe")).num_tokens == 2048
    assert resolve_model_config(compose(*TINY, "data=shakespeare_bpe", "model.num_tokens=4096")).num_tokens == 4096
    with pytest.raises(ConfigError, match=r"model.num_tokens \(300\) is smaller than .*vocabulary \(2048\)"):
        resolve_model_config(compose(*TINY, "data=shakespeare_bpe", "model.num_tokens=300"))
