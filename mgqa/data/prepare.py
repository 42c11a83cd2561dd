"""Tokenize a corpus once into memory-mappable token shards (format: ``mgqa.data.shards``).

    python -m mgqa.data.prepare data=shakespeare_bpe out=data/tokens/shakespeare-bpe
    python -m mgqa.data.prepare data=fineweb_edu out=/scratch/fineweb-gpt2 num_proc=16
    python train.py data=tokens data.dir=/scratch/fineweb-gpt2 data.tokenizer=gpt2

Any ``conf/data`` config is a source (local files or a hub dataset; its ``tokenizer``, ``val_files``
/ ``hub.val_split`` or ``val_fraction`` and ``seed``), with the options of ``conf/prepare.yaml``.
The train/val split is made here, by document: a separate validation source if the config has
one, else ``val_fraction`` of the documents: exactly that share of the files when each file is one
document (txt), otherwise each document with that probability by a hash of its position.

Documents are read in order by this process and tokenized by ``num_proc`` processes (the Rust
tokenizer also uses threads within one process). Shards and their indexes are written atomically;
after each shard the position in the source and the tokens not yet in a shard are saved, so an
interrupted run started again with the same command continues there. ``manifest.json`` is written
last: until it exists the directory is not a prepared set.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mgqa.atomic import atomic_write_bytes
from mgqa.data.shards import DTYPES, FORMAT, MANIFEST, VERSION, pick_dtype, shard_name, tokenizer_hash
from mgqa.data.sources import DocumentSource
from mgqa.data.stream import holdout_by_count, holdout_by_hash
from mgqa.data.tokenizer import build_tokenizer

CONF = Path(__file__).resolve().parents[2] / "conf"
PROGRESS = "progress.npz"
SPLITS = ("train", "val")


class ShardWriter:
    """Cuts one split's token stream into shards of ``shard_tokens`` tokens, each written atomically
    with the offsets just past each document's end-of-text token (``.idx``)."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int, saved: Optional[dict] = None) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        saved = saved or {}
        self.shards: list[dict] = list(saved.get("shards", []))
        self.pending: list[np.ndarray] = [saved["pending"]] if saved.get("pending") is not None else []
        self.pending_tokens = sum(p.size for p in self.pending)
        self.written = sum(s["tokens"] for s in self.shards)  # tokens of the split before `pending`
        self.ends: list[int] = list(saved.get("ends", []))  # absolute document ends not yet in a shard
        self.documents = int(saved.get("documents", 0))

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> bool:
        """Append documents (``tokens``: their tokens with end-of-text; ``lengths``: per document).
        Returns whether a shard was written."""
        if not tokens.size:
            return False
        end = self.written + self.pending_tokens
        self.ends.extend((end + np.cumsum(lengths)).tolist())
        self.documents += len(lengths)
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        wrote = False
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)
            wrote = True
        return wrote

    def finish(self) -> None:
        if self.pending_tokens:
            self._flush(self.pending_tokens)

    def _flush(self, size: int) -> None:
        stream = np.concatenate(self.pending)
        tokens, rest = stream[:size], stream[size:]
        stop = self.written + size
        n_ends = int(np.searchsorted(np.asarray(self.ends, dtype=np.int64), stop, side="right"))
        ends = np.asarray(self.ends[:n_ends], dtype=np.int64) - self.written
        name = shard_name(self.split, len(self.shards))
        atomic_write_bytes(self.out / f"{name}.idx", ends.tobytes())
        atomic_write_bytes(self.out / f"{name}.bin", tokens.astype(DTYPES[self.dtype], copy=False).tobytes())
        self.shards.append({"file": f"{name}.bin", "tokens": int(size), "documents": int(n_ends)})
        self.ends = self.ends[n_ends:]
        self.pending, self.pending_tokens, self.written = [rest], rest.size, stop

    def state(self) -> dict:
        pending = np.concatenate(self.pending) if self.pending else np.empty(0, dtype=DTYPES[self.dtype])
        return {"shards": self.shards, "pending": pending, "ends": self.ends, "documents": self.documents}

    def summary(self) -> dict:
        tokens = sum(s["tokens"] for s in self.shards)
        return {"tokens": tokens, "documents": sum(s["documents"] for s in self.shards), "shards": self.shards}


# -- tokenizing, in this process or a pool ---------------------------------------------------
_worker_tokenizer, _worker_dtype = None, "uint32"


def _init_worker(spec: str, eot_token: Optional[str], dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer, _worker_dtype = build_tokenizer(spec, eot_token), dtype


def _tokenize(texts: Sequence[str], tokenizer=None, dtype: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated tokens of ``texts``, each followed by end-of-text, at the shards' ``dtype`` (what
    a process sends back is 2-4x smaller than int64), and each document's length (int64)."""
    tokenizer, dtype = tokenizer or _worker_tokenizer, DTYPES[dtype or _worker_dtype]
    encoded = tokenizer.encode_batch(list(texts))
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    parts = [p for t in encoded for p in (t.numpy().astype(dtype), eot)]
    lengths = np.array([t.numel() + 1 for t in encoded], dtype=np.int64)
    return (np.concatenate(parts) if parts else np.empty(0, dtype=dtype)), lengths


# -- the plan: which documents go to which split ---------------------------------------------
def _sources(data: DictConfig, streaming: bool) -> list[tuple[DocumentSource, Optional[str]]]:
    """(source, split) passes; split None: held out by ``val_fraction`` per document."""
    text_field = data.get("text_field", "text")
    hub = data.get("hub")
    if data.get("files") is not None:
        train = DocumentSource(files=_plain(data.files), text_field=text_field)
        if data.get("val_files") is not None:
            return [(train, "train"), (DocumentSource(files=_plain(data.val_files), text_field=text_field), "val")]
        return [(train, None)]
    if not hub or not hub.get("path"):
        raise ValueError("the data config has neither data.files nor data.hub.path: nothing to prepare")
    common = dict(hub_path=hub.path, hub_name=hub.get("name"), text_field=text_field, streaming=streaming)
    train = DocumentSource(split=hub.get("split", "train"), **common)
    if hub.get("val_split"):
        return [(train, "train"), (DocumentSource(split=hub.val_split, **common), "val")]
    return [(train, None)]


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _documents(source: DocumentSource, start_shard: int, start_doc: int) -> Iterator[tuple[int, int, str]]:
    for shard in range(start_shard, source.num_shards):
        skip = start_doc if shard == start_shard else 0
        for j, text in enumerate(source.documents(shard)):
            if j >= skip:
                yield shard, j, text


def _count_documents(source: DocumentSource) -> Optional[int]:
    """The number of documents when it is cheap to know (for the progress bar's ETA), else None."""
    if not source.files:
        try:
            return sum(s.num_examples for s in source.dataset.info.splits.values()) or None
        except (AttributeError, TypeError):
            return None
    suffix = source.files[0].suffix.lower()
    if suffix in (".txt", ".md"):
        return len(source.files)
    if suffix == ".jsonl":
        lines = 0
        for path in source.files:
            with open(path, "rb") as f:
                lines += sum(chunk.count(b"\n") for chunk in iter(lambda f=f: f.read(1 << 24), b""))
        return lines
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 (a dependency of datasets)

        return sum(pq.ParquetFile(path).metadata.num_rows for path in source.files)
    return None


def _holdout(source: DocumentSource, val_fraction: float, seed: int):
    """The validation documents of a single source. One document per file (txt): exactly
    ``max(1, round(n * val_fraction))`` of the non-empty files, the same ones the streaming
    DataModule holds out. Otherwise each document by a hash of its position (no counting pass)."""
    if source.files and source.files[0].suffix.lower() in (".txt", ".md"):
        return holdout_by_count([[int(f.stat().st_size > 0)] for f in source.files], val_fraction, seed)
    return holdout_by_hash(val_fraction, seed)


# -- the run ---------------------------------------------------------------------------------
def fingerprint(cfg: DictConfig, tokenizer, dtype: str) -> dict:
    """What makes two preparations the same: an interrupted one resumes only under the same values."""
    data = cfg.data
    keys = ("files", "val_files", "hub", "text_field", "val_fraction", "seed")
    source = {k: _plain(data.get(k)) for k in keys}
    return {
        "source": source,
        "tokenizer": {"spec": data.tokenizer, "hash": tokenizer_hash(tokenizer), "vocab_size": tokenizer.vocab_size,
                      "eot_id": tokenizer.eot_id, "eot_token": data.get("eot_token")},  # fmt: skip
        "dtype": dtype,
        "shard_tokens": int(cfg.shard_tokens),
    }


def _load_progress(out: Path, print_fn) -> Optional[dict]:
    path = out / PROGRESS
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        for split in SPLITS:
            meta["writers"][split]["pending"] = saved[f"pending_{split}"]
    print_fn(f"continuing an interrupted preparation in {out} at document {meta['read']:,}")
    return meta


def _save_progress(out: Path, key: dict, position: tuple[int, int, int], read: int, writers: dict) -> None:
    states = {split: w.state() for split, w in writers.items()}
    meta = {"key": key, "position": list(position), "read": read,
            "writers": {s: {k: v for k, v in st.items() if k != "pending"} for s, st in states.items()}}  # fmt: skip
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **{f"pending_{s}": st["pending"] for s, st in states.items()})
    atomic_write_bytes(out / PROGRESS, buffer.getvalue())


def _check_options(cfg: DictConfig) -> None:
    if not cfg.get("out"):
        raise ValueError("out is required: the directory to write the shards to, e.g. out=data/tokens/mine")
    for name in ("num_proc", "shard_tokens", "batch_docs"):
        value = cfg.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def prepare(cfg: DictConfig, print_fn=print, progress: bool = True) -> Path:
    """Run a preparation (or finish an interrupted one) and return the output directory."""
    from tqdm.auto import tqdm  # noqa: PLC0415 (only for the command)

    _check_options(cfg)
    data = cfg.data
    tokenizer = build_tokenizer(data.tokenizer, data.get("eot_token"))
    dtype = pick_dtype(str(cfg.dtype), tokenizer.vocab_size)
    key = fingerprint(cfg, tokenizer, dtype)
    out = Path(cfg.out)
    if (out / MANIFEST).is_file():
        done = json.loads((out / MANIFEST).read_text())
        if {k: done.get(k) for k in key} == key:
            print_fn(f"{out} is already prepared with this config ({done['splits']['train']['tokens']:,} training tokens)")
            return out
        raise ValueError(f"{out} holds a preparation of another config; choose another out or delete it")
    passes = _sources(data, bool(cfg.streaming))
    keep_val = None if len(passes) == 2 else _holdout(passes[0][0], float(data.val_fraction), int(data.seed))
    out.mkdir(parents=True, exist_ok=True)
    saved = _load_progress(out, print_fn)
    if saved is not None and saved["key"] != key:
        diff = sorted(k for k in key if saved["key"].get(k) != key[k])
        raise ValueError(f"{out} holds an unfinished preparation with other {', '.join(diff)}; "
                         "use the same config to finish it, or delete the directory")  # fmt: skip
    writers = {s: ShardWriter(out, s, dtype, int(cfg.shard_tokens), (saved or {}).get("writers", {}).get(s)) for s in SPLITS}
    start_pass, start_shard, start_doc = saved["position"] if saved else (0, 0, 0)
    read = saved["read"] if saved else 0

    pool = None
    if cfg.num_proc > 1:
        # Not fork: a parent whose torch or Rust thread pools already ran deadlocks a forked child.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(["mgqa.data.prepare"])  # imported once by the server, not by every worker
        pool = context.Pool(cfg.num_proc, _init_worker, (data.tokenizer, data.get("eot_token"), dtype))
    totals = [_count_documents(src) for src, _ in passes]
    bar = tqdm(total=None if None in totals else sum(totals), initial=read, unit="doc", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)  # fmt: skip
    # The rate counts from the first batch back, so process start-up does not dilute it.
    started, tokens_done, first_tokens = None, 0, 0
    try:
        for p in range(start_pass, len(passes)):
            source, split = passes[p]
            first = (start_shard, start_doc) if p == start_pass else (0, 0)

            def tasks() -> Iterator[tuple[tuple, int, list[str], list[str]]]:
                # (position after the task, documents read, each document's split, texts); empty ones skipped
                splits, texts, last, n_read = [], [], None, 0
                for shard, j, text in _documents(source, *first):
                    last, n_read = (shard, j), n_read + 1
                    if text:
                        splits.append(split or ("val" if keep_val(shard, j) else "train"))
                        texts.append(text)
                    if len(texts) == cfg.batch_docs:
                        yield (p, shard, j + 1), n_read, splits, texts
                        splits, texts, n_read = [], [], 0
                if last is not None:
                    yield (p, last[0], last[1] + 1), n_read, splits, texts

            for position, n_read, splits, tokens, lengths in _run(tasks(), pool, tokenizer, dtype, cfg.num_proc):
                wrote = False
                bounds = np.concatenate(([0], np.cumsum(lengths)))
                for name in SPLITS:
                    mine = np.array([s == name for s in splits], dtype=bool)
                    if mine.any():
                        pieces = [tokens[bounds[i] : bounds[i + 1]] for i in np.flatnonzero(mine)]
                        wrote |= writers[name].add(np.concatenate(pieces), lengths[mine])
                read += n_read
                tokens_done += tokens.size
                if started is None:
                    started, first_tokens = time.perf_counter(), tokens_done
                bar.update(n_read)
                rate = (tokens_done - first_tokens) / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s, {sum(w.written + w.pending_tokens for w in writers.values()):,} tokens")
                if wrote:
                    _save_progress(out, key, position, read, writers)
        for writer in writers.values():
            writer.finish()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    rate = (tokens_done - first_tokens) / max(time.perf_counter() - (started or 0.0), 1e-9) if started else 0.0
    if not writers["train"].shards:
        raise ValueError(f"the source has no training text (every document is empty or held out): {key['source']}")
    if not writers["val"].shards:
        raise ValueError(
            f"no document was held out for validation (data.val_fraction={data.get('val_fraction')}); "
            "raise it or give data.val_files / data.hub.val_split"
        )
    manifest = {"format": FORMAT, "version": VERSION, **key, "splits": {s: w.summary() for s, w in writers.items()},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    (out / PROGRESS).unlink(missing_ok=True)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print_fn(
        f"wrote {out}: train {train['tokens']:,} tokens ({train['documents']:,} documents, {len(train['shards'])} "
        f"shards), val {val['tokens']:,} tokens ({val['documents']:,} documents); {dtype}; "
        f"{rate / 1e6:.2f}M tokens/s with {cfg.num_proc} process(es)"
    )
    return out


def _run(tasks, pool, tokenizer, dtype: str, num_proc: int):
    """(position, documents read, splits, tokens, lengths) per task, in order; a few tasks in flight
    at most, so memory stays bounded however fast the source reads."""
    if pool is None:
        for position, n_read, splits, texts in tasks:
            yield position, n_read, splits, *_tokenize(texts, tokenizer, dtype)
        return
    in_flight: deque = deque()
    for position, n_read, splits, texts in tasks:
        in_flight.append((position, n_read, splits, pool.apply_async(_tokenize, (texts,))))
        if len(in_flight) >= 2 * num_proc:
            position, n_read, splits, result = in_flight.popleft()
            yield position, n_read, splits, *result.get()
    while in_flight:
        position, n_read, splits, result = in_flight.popleft()
        yield position, n_read, splits, *result.get()


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/prepare.yaml`` with ``overrides`` (``data=<config>``, ``out=<dir>``, ...)."""
    from mgqa.lit.overrides import compose_config as compose  # noqa: PLC0415

    return compose(CONF, "prepare", overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose_config(argv)
    except Exception as err:  # Hydra refused an override: one line naming it and what exists instead
        if not type(err).__module__.startswith(("hydra", "omegaconf")):
            raise
        from mgqa.lit.overrides import check_overrides  # noqa: PLC0415

        raise SystemExit(f"error: {check_overrides(CONF, 'prepare', argv) or err}") from None
    try:
        prepare(cfg)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to continue in {cfg.out}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # a bad value or path, an unreachable hub
        raise SystemExit(f"error: {err}") from None
    except Exception as err:  # an interpolation the config cannot resolve, read while preparing
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            raise SystemExit(f"error: {err}") from None
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
