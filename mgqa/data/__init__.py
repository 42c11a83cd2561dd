"""Tokenizers and streaming datasets. No Lightning here: ``mgqa.lit`` wraps these in a DataModule."""

from mgqa.data.sources import DataError, DocumentSource, check_file, resolve_files
from mgqa.data.stream import PackedStream, count_tokens, holdout_by_count, holdout_by_hash
from mgqa.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataError",
    "DocumentSource",
    "HFTokenizer",
    "PackedStream",
    "build_tokenizer",
    "check_file",
    "count_tokens",
    "holdout_by_count",
    "holdout_by_hash",
    "resolve_files",
]
