"""Local txt/jsonl/parquet and hub-layout sources, and bad input: each works or fails naming the culprit."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mgqa.data import ByteTokenizer, DocumentSource, PackedStream, count_tokens, resolve_files
from mgqa.lit.datamodule import TextDataModule
from tests.data.conftest import corpus_counter, rank_stream, targets_counter, write_docs

pytestmark = pytest.mark.timeout(120)


def test_embedded_corpus_is_present_and_clean():
    source = DocumentSource(files="data/shakespeare/*.txt")
    assert source.num_shards == 42
    docs = [doc for shard in range(source.num_shards) for doc in source.documents(shard)]
    assert len(docs) == 42  # one document per file
    text = "".join(docs)
    assert len(text) > 4_000_000
    assert "Gutenberg" not in text and "To be, or not to be" in text


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_and_parquet_shards_with_a_text_field(tmp_path):
    docs = [f"story number {i}: " + "once upon a time " * (i + 2) for i in range(12)]
    (tmp_path / "j").mkdir()
    for shard in range(3):
        write_jsonl(tmp_path / "j" / f"part{shard}.jsonl", [{"id": i, "story": docs[i]} for i in range(shard, 12, 3)])
    (tmp_path / "p").mkdir()
    for shard in range(2):
        table = pa.table({"story": docs[shard::2], "n": list(range(len(docs[shard::2])))})
        pq.write_table(table, tmp_path / "p" / f"part{shard}.parquet")
    for pattern in (str(tmp_path / "j" / "*.jsonl"), [str(tmp_path / "p" / "part0.parquet"), str(tmp_path / "p" / "part1.parquet")]):
        source = DocumentSource(files=pattern, text_field="story")
        got = sorted(doc for shard in range(source.num_shards) for doc in source.documents(shard))
        assert got == sorted(docs)
    with pytest.raises(ValueError, match=r"text field 'text' is not in .*part0.jsonl; its fields are \['id', 'story'\]"):
        list(DocumentSource(files=str(tmp_path / "j" / "*.jsonl")).documents(0))
    with pytest.raises(ValueError, match=r"text field 'body' is not in .*part0.parquet"):
        list(DocumentSource(files=str(tmp_path / "p" / "*.parquet"), text_field="body").documents(0))


def test_missing_files_empty_glob_and_unknown_format_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        resolve_files(str(tmp_path / "nothing-here" / "*.txt"))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        TextDataModule(files=str(tmp_path / "*.jsonl"), seq_len=8, batch_size=2).check_files()
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"a.csv' has an unknown extension"):
        DocumentSource(files=str(tmp_path / "a.csv"))


def test_non_utf8_file_is_named(tmp_path):
    write_docs(tmp_path, ["fine text"])
    (tmp_path / "doc001.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    source = DocumentSource(files=str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match=r"doc001.txt is not UTF-8"):
        count_tokens(source, ByteTokenizer())


def test_non_utf8_file_fails_inside_workers_too(tmp_path):
    write_docs(tmp_path, ["fine text " * 50, "more text " * 50])
    (tmp_path / "doc001.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"doc001.txt is not UTF-8"):
        rank_stream(str(tmp_path / "*.txt"), 0, 1, 2, batches_per_epoch=4)


def test_empty_documents_and_one_very_long_document(tmp_path):
    long_doc = "".join(chr(ord("a") + i % 26) for i in range(8 * 100 + 3))  # a hundred windows
    docs = ["", long_doc, "", "short"]
    files = write_docs(tmp_path, docs)
    _, _, (batches,) = rank_stream(files, 0, 1, 2, shuffle=False, batch_size=4)
    seen = targets_counter(batches)
    corpus = corpus_counter(docs)
    assert not seen - corpus and sum(seen.values()) == len(batches) * 4 * 8
    windows = (len(long_doc) + 1 + len("short") + 1 - 1) // 8
    assert len(batches) == windows // 2 // 4 * 2  # 2 workers, whole batches of 4 each


def test_corpus_smaller_than_one_batch_fails_with_the_numbers(tmp_path):
    files = write_docs(tmp_path, ["tiny", "texts", "only"])
    with pytest.raises(ValueError, match=r"split has 1 windows of 8 tokens, fewer than one batch for each of 4"):
        rank_stream(files, 0, 2, 2, batch_size=2)
    dm = TextDataModule(files=files, seq_len=8, batch_size=64, val_fraction=0.3)
    with pytest.raises(ValueError, match="data.batch_size 64"):
        dm.setup()
    with pytest.raises(ValueError, match="data.batch_size must be a positive integer, got 0"):
        TextDataModule(files="x", seq_len=16, batch_size=0)


def test_fixed_epochs_on_an_empty_split_fail_instead_of_hanging(tmp_path):
    files = write_docs(tmp_path, ["", ""])
    with pytest.raises(ValueError, match="found no train text in a full pass over 2 shard"):
        rank_stream(files, 0, 1, 0, batches_per_epoch=3)


def test_datamodule_holds_out_whole_documents(tmp_path):
    docs = [f"{i:02d}" * 100 for i in range(20)]  # each document is one repeated two-digit number
    files = write_docs(tmp_path, docs)
    dm = TextDataModule(files=files, seq_len=16, batch_size=2, val_fraction=0.1, seed=5)
    dm.setup()
    def numbers(loader):
        return {bytes(t for t in x.flatten().tolist() if t < 256).decode()[:2] for x, _ in loader}
    train, val = numbers(dm.train_dataloader()), numbers(dm.val_dataloader())
    assert len(val) == 2 and not train & val
    again = TextDataModule(files=files, seq_len=16, batch_size=2, val_fraction=0.1, seed=5)
    again.setup()
    assert numbers(again.val_dataloader()) == val
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.long


def write_hub_layout(root, docs, val_docs=None):
    """A directory laid out like a hub dataset repository (README configs + parquet shards), as
    FineWeb-Edu's `sample-10BT` config is: `load_dataset(path, name, split)` reads it the same way."""
    (root / "sample" / "10BT").mkdir(parents=True)
    for shard in range(3):
        part = docs[shard::3]
        pq.write_table(pa.table({"text": part, "id": [f"{shard}-{i}" for i in range(len(part))]}), root / "sample" / "10BT" / f"00{shard}_00000.parquet")
    splits = "  - split: train\n    path: sample/10BT/*.parquet\n"
    if val_docs:
        pq.write_table(pa.table({"text": val_docs}), root / "sample" / "validation.parquet")
        splits += "  - split: validation\n    path: sample/validation.parquet\n"
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n{splits}---\n")


def test_hub_presets_load_a_hub_layout_through_the_same_path(tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import TINY, compose

    docs = [f"web page {i}: " + "education matters. " * (5 + i % 7) for i in range(60)]
    val_docs = [f"held out page {i}: " + "lessons learned. " * 8 for i in range(6)]
    write_hub_layout(tmp_path / "hub", docs, val_docs)
    common = (*TINY, f"data.hub.path={tmp_path / 'hub'}", "data.tokenizer=byte", "data.num_workers=2", "model.max_seq_len=32")
    for preset, val_split in (("fineweb_edu", "null"), ("tinystories", "validation")):
        cfg = compose(*common, f"data={preset}", "data.hub.name=sample-10BT", f"data.hub.val_split={val_split}", "data.batches_per_epoch=6", "data.val_fraction=0.2")
        data = instantiate(cfg.data)
        data.setup()
        train = [x for x, _ in data.train_dataloader()]
        val = [x for x, _ in data.val_dataloader()]
        assert len(train) == 6 and train[0].shape == (4, 32)
        text = lambda batches: bytes(t for b in batches for t in b.flatten().tolist() if t < 256).decode(errors="ignore")
        if val_split == "validation":
            assert "held out" in text(val) and "held out" not in text(train)
        else:  # a hashed fraction of the documents, never in training
            val_pages = {p.split(":")[0] for p in text(val).split("web page ")[1:]}
            assert len(val) == 16 and not {p for p in text(train).split("web page ")[1:] if p.split(":")[0] in val_pages and ":" in p}
