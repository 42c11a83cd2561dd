"""python -m mgqa.data.prepare: shard contents, the split by document, parallel and restartable runs,
and a one-line error for every bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from mgqa.data import ByteTokenizer
from mgqa.data.prepare import compose_config, main, prepare
from mgqa.data.shards import open_shards, read_manifest
from tests.conftest import ROOT
from tests.data.conftest import write_docs

pytestmark = pytest.mark.timeout(120)


def docs_of(n=12):
    return [f"doc {i}: " + "".join(chr(97 + (i * 5 + k) % 26) for k in range(30 + 17 * i)) for i in range(n)]


def run_prepare(files, out, *extra):
    cfg = compose_config([f"data.files={files}", f"out={out}", "data.val_fraction=0.2", *extra])
    return prepare(cfg, print_fn=lambda *_: None, progress=False)


def split_documents(out, split):
    """The documents of a split, decoded from the shards through their index."""
    shards = open_shards(out, split)
    stream = np.concatenate([np.asarray(s.tokens) for s in shards]).astype(np.int64)
    ends = np.concatenate([s.document_ends() + sum(x.num_tokens for x in shards[:k]) for k, s in enumerate(shards)])
    assert ends[-1] == stream.size and (stream[ends - 1] == 256).all()  # every document ends with end-of-text
    starts = np.concatenate(([0], ends[:-1]))
    return [bytes(stream[a : b - 1].tolist()).decode() for a, b in zip(starts, ends)]


def test_shards_hold_every_document_once_with_end_of_text_split_by_document(tmp_path):
    docs = docs_of()
    out = run_prepare(write_docs(tmp_path / "docs", docs), tmp_path / "tok", "shard_tokens=500")
    manifest = read_manifest(out)
    train, val = split_documents(out, "train"), split_documents(out, "val")
    assert sorted(train + val) == sorted(docs) and len(val) == round(0.2 * len(docs))  # whole documents, no overlap
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["spec"] == "byte"
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 2 and all(s["tokens"] == 500 for s in shards[:-1])  # fixed-size shards, documents span them
    assert manifest["splits"]["train"]["tokens"] == sum(len(d) + 1 for d in train)
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert not (out / "progress.npz").exists()


def test_two_processes_write_the_same_bytes_as_one(tmp_path):
    files = write_docs(tmp_path / "docs", docs_of(30))
    one = run_prepare(files, tmp_path / "one", "shard_tokens=700", "batch_docs=4")
    two = run_prepare(files, tmp_path / "two", "shard_tokens=700", "batch_docs=4", "num_proc=2")
    for path in sorted(one.glob("*_*.*")):
        assert path.read_bytes() == (two / path.name).read_bytes(), path.name


def test_an_interrupted_prepare_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    import mgqa.data.prepare as prep

    files = write_docs(tmp_path / "docs", docs_of(30))
    whole = run_prepare(files, tmp_path / "whole", "shard_tokens=600", "batch_docs=3")
    calls, real = [], prep._tokenize

    def dies_on_the_sixth_call(texts, tokenizer=None, dtype=None):
        calls.append(texts)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(texts, tokenizer, dtype)

    monkeypatch.setattr(prep, "_tokenize", dies_on_the_sixth_call)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(files, tmp_path / "cut", "shard_tokens=600", "batch_docs=3")
    cut = tmp_path / "cut"
    assert (cut / "progress.npz").is_file() and not (cut / "manifest.json").exists()
    assert not list(cut.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="unfinished preparation"):
        read_manifest(cut)
    monkeypatch.setattr(prep, "_tokenize", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
    args = [f"data.files={files}", f"out={cut}", "data.val_fraction=0.2", "shard_tokens=600", "batch_docs=3"]
    assert main(args) == 130  # Ctrl-C: a hint, no traceback
    assert "run the same command again to continue" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(prep, "_tokenize", lambda texts, tokenizer=None, dtype=None: (calls.append(texts), real(texts, tokenizer, dtype))[1])
    run_prepare(files, cut, "shard_tokens=600", "batch_docs=3")
    assert sum(len(c) for c in calls) < 30 - 3 * 3  # documents before the last saved shard are not tokenized again
    names = sorted(p.name for p in whole.glob("*_*.*"))
    assert names == sorted(p.name for p in cut.glob("*_*.*"))
    for name in names:
        assert (whole / name).read_bytes() == (cut / name).read_bytes(), name
    manifest = lambda d: {k: v for k, v in json.loads((d / "manifest.json").read_text()).items() if k != "created"}  # noqa: E731
    assert manifest(whole) == manifest(cut)


def test_a_separate_validation_source_and_a_wide_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70_000)} | {"<|endoftext|>": 70_000}
    big = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    train = write_docs(tmp_path / "train", ["w1 w69999 w5", "w2 w3"])
    val = write_docs(tmp_path / "val", ["w65537 w4"])
    out = run_prepare(train, tmp_path / "tok", f"data.val_files={val}", f"data.tokenizer={tmp_path / 'big.json'}")
    manifest = read_manifest(out)
    assert manifest["dtype"] == "uint32" and manifest["splits"]["val"]["documents"] == 1
    assert np.asarray(open_shards(out, "val")[0].tokens).tolist() == [65537, 4, 70_000]
    with pytest.raises(SystemExit, match=r"^error: a vocabulary of 70001 tokens does not fit uint16"):
        main([f"data.files={train}", f"out={tmp_path / 'narrow'}", "dtype=uint16", f"data.tokenizer={tmp_path / 'big.json'}"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "out is required"),
        (["num_proc=0"], "num_proc must be a positive integer, got 0"),
        (["dtype=int8"], "dtype must be auto, uint16 or uint32, got 'int8'"),
        (["data.files=nowhere/*.txt"], "data file pattern 'nowhere/*.txt' matched no files"),
        (["data=nonesuch"], "data=nonesuch: no such option; choose from fineweb_edu, shakespeare"),
        (["num_procs=2"], "num_procs is not an option: did you mean num_proc?"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, args, message):
    out = [f"out={tmp_path / 'x'}"] if "out is required" not in message else []
    with pytest.raises(SystemExit) as exc:
        main([*out, *args])
    text = str(exc.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_another_config_in_the_same_directory_is_refused(tmp_path):
    files = write_docs(tmp_path / "docs", docs_of())
    run_prepare(files, tmp_path / "tok")
    run_prepare(files, tmp_path / "tok")  # the same config again: nothing to do
    with pytest.raises(ValueError, match="holds a preparation of another config"):
        run_prepare(files, tmp_path / "tok", "data.seed=5")


def test_the_command_line_prepares_the_embedded_corpus(tmp_path):
    """The documented form, `python -m mgqa.data.prepare data=<config> out=<dir>`, on the embedded corpus."""
    out = tmp_path / "shakespeare"
    done = subprocess.run(
        [sys.executable, "-m", "mgqa.data.prepare", "data=shakespeare", f"out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {out}: train 4,803,808 tokens (40 documents" in done.stdout
    assert "tok/s" in done.stderr  # the progress bar
    manifest = read_manifest(out)
    assert manifest["splits"]["val"]["documents"] == 2
    first = (ROOT / "data/shakespeare").glob("*.txt")
    texts = {p.read_text(encoding="utf-8") for p in first}
    assert set(split_documents(out, "val")) <= texts and set(split_documents(out, "train")) <= texts
    assert ByteTokenizer().eot_id == manifest["tokenizer"]["eot_id"]


@pytest.mark.parametrize("streaming", [True, False])
def test_a_hub_layout_directory_with_its_own_validation_split(tmp_path, monkeypatch, streaming):
    """data.hub (here a local directory laid out like a hub dataset) with hub.val_split, streamed or
    first downloaded into the datasets cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    hub = tmp_path / "hub"
    hub.mkdir()
    rows = {"train": [f"story {i} " * (i + 2) for i in range(9)], "validation": ["the end", "", "again"]}
    for split, texts in rows.items():
        (hub / f"{split}.jsonl").write_text("".join(json.dumps({"story": t}) + "\n" for t in texts))
    cfg = compose_config(["data=tinystories", f"data.hub.path={hub}", "data.text_field=story", "data.tokenizer=byte",
                          f"out={tmp_path / 'tok'}", f"streaming={streaming}"])  # fmt: skip
    out = prepare(cfg, print_fn=lambda *_: None, progress=False)
    assert split_documents(out, "train") == rows["train"]  # in order, nothing held out of train
    assert split_documents(out, "val") == ["the end", "again"]  # empty documents skipped
    assert any((tmp_path / "cache").rglob("*.arrow")) != streaming


def test_jsonl_rows_are_held_out_by_a_hash_of_their_position(tmp_path):
    from mgqa.data.prepare import _count_documents
    from mgqa.data.sources import DocumentSource

    texts = [f"row {i} " * (i + 1) for i in range(24)]
    for part in range(2):
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[part::2]))
    files = str(tmp_path / "*.jsonl")
    assert _count_documents(DocumentSource(files=files)) == 24  # the progress bar's total, for its ETA
    out = run_prepare(files, tmp_path / "tok", "data.val_fraction=0.3")
    train, val = split_documents(out, "train"), split_documents(out, "val")
    assert sorted(train + val) == sorted(texts) and 0 < len(val) < 24
    again = run_prepare(files, tmp_path / "again", "data.val_fraction=0.3")
    assert split_documents(again, "val") == val  # the same rows on every run
