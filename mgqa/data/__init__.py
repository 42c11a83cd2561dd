"""Tokenizers and datasets. No Lightning here: ``mgqa.lit`` wraps these in a DataModule."""

from mgqa.data.text import PackedWindows, pack, read_documents, resolve_files, split_documents
from mgqa.data.tokenizer import ByteTokenizer, build_tokenizer

__all__ = ["ByteTokenizer", "PackedWindows", "build_tokenizer", "pack", "read_documents", "resolve_files", "split_documents"]
