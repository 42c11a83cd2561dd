"""Where documents come from: local txt/jsonl/parquet files or a hub dataset, streamed by HF ``datasets``.

A source is a list of shards (one per file for local data; the dataset's own shards for the hub),
each an ordered stream of documents. Shards are the unit the sampler shuffles and hands out.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

class DataError(ValueError):
    """A data file that cannot be read as documents; the message names the file (and line)."""


# HF builder per file extension; `sample_by="document"` makes each .txt file one document.
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def resolve_files(pattern: str | Sequence[str]) -> list[Path]:
    """Expand one glob or a list of globs/paths into sorted files; raise naming what matched nothing."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise FileNotFoundError("data.files is empty: give at least one file or glob")
    files: list[Path] = []
    for pat in patterns:
        matches = sorted(Path(p) for p in glob.glob(str(pat), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise FileNotFoundError(f"data file pattern {str(pat)!r} matched no files (cwd: {Path.cwd()})")
        files.extend(matches)
    return files


def _builder_for(files: Sequence[Path]) -> str:
    kinds = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if f.suffix.lower() not in BUILDERS)
        raise DataError(f"data file {str(bad)!r} has an unknown extension; supported: {sorted(BUILDERS)}")
    if len(kinds) > 1:
        raise DataError(f"data files mix formats {sorted(kinds)}; use one format per split")
    return kinds.pop()


SNIFF_BYTES = 1 << 16


def check_file(path: Path, text_field: str = "text") -> None:
    """Cheap checks of a local data file before any work starts: its extension, that it is not empty,
    that its first ``SNIFF_BYTES`` are UTF-8 text (txt/jsonl), and that the jsonl lines among them are
    JSON objects, the first holding ``text_field``. Raise ``DataError`` naming the file (and line);
    errors further in are named the same way when they are read."""
    builder = _builder_for([path])
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if builder == "parquet":
        return  # a binary format: pyarrow names a damaged file when it is opened
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the sniffed bytes
            raise DataError(f"data file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        text = head[: err.start].decode("utf-8")
    if "\x00" in text:
        raise DataError(f"data file {path} holds NUL bytes: binary data, not text")
    if builder == "json" and path.suffix.lower() == ".jsonl":
        lines = text.splitlines()
        if len(head) == SNIFF_BYTES:
            lines = lines[:-1]  # the last sniffed line may be cut
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        if not numbered and len(head) < SNIFF_BYTES:
            raise DataError(f"data file {path} has no JSON lines")
        for number, line in numbered:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number} is not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is a JSON {type(row).__name__}, not an object")
            if number == numbered[0][0] and text_field not in row:
                raise DataError(
                    f"{path} line {number} has no text field {text_field!r} (its fields: {sorted(row)}); "
                    "set data.text_field"
                )


def bad_json_line(path: Path) -> str:
    """The first line of a jsonl file that is not a JSON object, as ``line N (reason)``."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg}, column {err.colno})"
            if not isinstance(row, dict):
                return f"line {number} is a JSON {type(row).__name__}, not an object"
    return "a line could not be parsed"


class DocumentSource:
    """Documents of one split, streamed (``streaming=True``) from local files or the hub.

    Local: ``files`` (globs) of one format; ``.txt`` files are one document each, jsonl/parquet rows
    are documents with the text in ``text_field``. Hub: ``hub_path`` (+ ``hub_name`` config) and
    ``split``, e.g. ``HuggingFaceFW/fineweb-edu``, ``sample-10BT``, ``train``; a local directory laid
    out like a hub dataset repository works the same way. ``streaming=False`` downloads a hub
    dataset into the ``datasets`` cache first and reads it from there.
    """

    def __init__(
        self,
        files: str | Sequence[str] | None = None,
        text_field: str = "text",
        hub_path: Optional[str] = None,
        hub_name: Optional[str] = None,
        split: str = "train",
        streaming: bool = True,
    ) -> None:
        from datasets import load_dataset  # noqa: PLC0415 (slow import; only when data is read)

        if (files is None) == (hub_path is None):
            raise ValueError("give exactly one of data.files (local files) or data.hub.path (a hub dataset)")
        self.text_field = text_field
        if files is not None:
            self.files = resolve_files(files)
            builder = _builder_for(self.files)
            extra = {"sample_by": "document"} if builder == "text" else {}
            self.dataset = load_dataset(
                builder, data_files={"train": [str(f) for f in self.files]}, split="train", streaming=True, **extra
            )
            self.names = [str(f) for f in self.files]
        else:
            self.files = []
            self.dataset = load_dataset(hub_path, name=hub_name, split=split, streaming=streaming)
            if not streaming:  # cached Arrow files, read as shards like a streamed dataset
                self.dataset = self.dataset.to_iterable_dataset(num_shards=max(1, len(self.dataset.cache_files)))
            label = f"{hub_path}" + (f" ({hub_name})" if hub_name else "") + f" split {split!r}"
            self.names = [f"{label} shard {i}" for i in range(self.dataset.n_shards)]
        if len(self.names) != self.dataset.n_shards:
            raise RuntimeError(f"expected {len(self.names)} shards, the dataset has {self.dataset.n_shards}")

    @property
    def num_shards(self) -> int:
        return len(self.names)

    def documents(self, shard: int) -> Iterator[str]:
        """The documents of ``shard`` in order; errors name the file (or shard) and the field."""
        name = self.names[shard]
        stream = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        try:
            # `.iter` rather than `for row in stream`: inside a DataLoader worker the latter splits the
            # shards again over the workers, and this shard is already one worker's share.
            for batch in stream.iter(batch_size=64):
                if self.text_field not in batch:
                    raise DataError(
                        f"text field {self.text_field!r} is not in {name}; its fields are {sorted(batch)} "
                        "(set data.text_field)"
                    )
                for text in batch[self.text_field]:
                    if text is None:
                        continue
                    if not isinstance(text, str):
                        raise DataError(
                            f"text field {self.text_field!r} of {name} holds {type(text).__name__}, not text"
                        )
                    yield text
        except UnicodeDecodeError as err:
            raise DataError(f"{name} is not UTF-8 text ({err.reason} at byte {err.start})") from err
        except DataError:
            raise
        except Exception as err:  # pyarrow/datasets parse errors, which name neither the file nor the line
            if name.endswith((".jsonl", ".json")) and Path(name).is_file():
                raise DataError(f"{name} {bad_json_line(Path(name))}") from err
            raise DataError(f"{name} could not be read ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from err
