"""Pre-tokenized token shards on disk: the format ``mgqa.data.prepare`` writes and ``TokenWindows`` reads.

A prepared directory holds, per split (``train``, ``val``):

* ``<split>_<k>.bin``: raw tokens, little-endian ``uint16`` (``uint32`` when the vocabulary needs it),
  ``shard_tokens`` per file except the last. Documents follow each other, each ended by end-of-text;
  a document may continue in the next shard.
* ``<split>_<k>.idx``: ``int64`` offsets, within the shard, just past each end-of-text token (the
  document boundaries), so a reader can find documents without scanning tokens.

and ``manifest.json`` (written last: a directory without it is not a finished preparation) with
the dtype, the tokenizer (its spec, vocabulary, end-of-text id and a content hash), the source, and
per shard its file, token and document counts. ``open_shards`` checks all of it before training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

FORMAT = "mgqa-tokens"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def tokenizer_hash(tokenizer) -> str:
    """A content hash of ``tokenizer``: the same vocabulary and rules give the same hash, whatever
    the file is called (``sha256:`` + 16 hex digits)."""
    if getattr(tokenizer, "tok", None) is not None:  # HFTokenizer: its full JSON serialisation
        content = tokenizer.tok.to_str()
    else:
        content = json.dumps(tokenizer.state(), sort_keys=True)
    content += f"\neot={tokenizer.eot_id}"
    return "sha256:" + hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def pick_dtype(requested: str, vocab_size: int) -> str:
    """``auto``: uint16 when every token id fits, else uint32. An explicit uint16 that cannot hold
    the vocabulary is an error naming both."""
    if requested not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be auto, uint16 or uint32, got {requested!r}")
    if requested == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested == "uint16" and vocab_size > 2**16:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens does not fit uint16 (at most 65536); use dtype=uint32 or auto"
        )
    return requested


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}"


@dataclass
class Shard:
    """One memory-mapped shard: ``tokens`` (a read-only ``np.memmap``) and its document ends."""

    path: Path
    num_tokens: int
    num_documents: int
    dtype: str
    _tokens: Optional[np.memmap] = None

    @property
    def tokens(self) -> np.ndarray:
        # Opened on first use, so a dataset pickled to dataloader workers carries paths, not maps.
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r", shape=(self.num_tokens,))
        return self._tokens

    def document_ends(self) -> np.ndarray:
        return np.fromfile(self.path.with_suffix(".idx"), dtype=np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory; errors name the directory and what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FileNotFoundError(f"token directory {str(directory)!r} does not exist (cwd: {Path.cwd()}); "
                                "make it with python -m mgqa.data.prepare data=<config> out=<dir>")  # fmt: skip
    if not path.is_file():
        partial = " (an unfinished preparation: run prepare again to complete it)" if any(directory.glob("*.bin")) else ""
        raise FileNotFoundError(f"{path} does not exist{partial}; make it with python -m mgqa.data.prepare")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{path} is not an {FORMAT} v{VERSION} manifest (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r})"
        )
    return manifest


def open_shards(directory: str | Path, split: str, manifest: Optional[dict] = None) -> list[Shard]:
    """The shards of ``split``, each checked to exist and to hold exactly its tokens (a truncated or
    missing file is named with the sizes expected and found)."""
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(f"{directory / MANIFEST} has no {split!r} split; it has {sorted(splits)}")
    dtype = manifest["dtype"]
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    shards = []
    for entry in splits[split]["shards"]:
        path = directory / entry["file"]
        expected = entry["tokens"] * itemsize
        for needed in (path, path.with_suffix(".idx")):
            if not needed.is_file():
                raise FileNotFoundError(f"shard {needed} is missing (listed in {directory / MANIFEST})")
        found = path.stat().st_size
        if found != expected:
            state = "truncated" if found < expected else "longer than its manifest entry"
            raise ValueError(
                f"shard {path} is {state}: {found} bytes, the manifest says {entry['tokens']} {dtype} tokens "
                f"= {expected} bytes; prepare it again"
            )
        index_bytes = path.with_suffix(".idx").stat().st_size
        if index_bytes != 8 * entry["documents"]:
            raise ValueError(
                f"shard index {path.with_suffix('.idx')} is {index_bytes} bytes, the manifest says "
                f"{entry['documents']} documents = {8 * entry['documents']} bytes; prepare it again"
            )
        shards.append(Shard(path, entry["tokens"], entry["documents"], dtype))
    return shards


def check_tokenizer(manifest: dict, tokenizer, directory: str | Path) -> None:
    """Refuse shards made by another tokenizer, naming both hashes (and both specs)."""
    made_with = manifest["tokenizer"]
    run_hash = tokenizer_hash(tokenizer)
    if made_with["hash"] != run_hash:
        raise ValueError(
            f"the shards in {directory} were tokenized by {made_with['spec']!r} ({made_with['hash']}), "
            f"this run uses {tokenizer.name!r} ({run_hash}); set data.tokenizer={made_with['spec']} "
            "or prepare the data again with this tokenizer"
        )
