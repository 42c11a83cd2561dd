"""Train a byte-level BPE tokenizer with the ``tokenizers`` library and save it as one JSON file.

    python -m mgqa.data.train_bpe --files 'data/shakespeare/*.txt' --vocab-size 2048 \
        --out data/tokenizers/shakespeare-bpe-2k.json

Byte-level means any text encodes (no unknown token); ``<|endoftext|>`` is the one special token and
separates documents when they are packed. Use the result with ``data.tokenizer=PATH``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mgqa.data.sources import DocumentSource

EOT = "<|endoftext|>"


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer with ``vocab_size`` tokens (256 bytes + merges + ``<|endoftext|>``)."""
    if vocab_size < 257:
        raise ValueError(f"--vocab-size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", required=True, help="text/jsonl/parquet files or globs")
    parser.add_argument("--text-field", default="text", help="column holding the text (jsonl/parquet)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--out", required=True, help="output tokenizer.json path")
    args = parser.parse_args(argv)
    source = DocumentSource(files=args.files, text_field=args.text_field)
    texts = (text for shard in range(source.num_shards) for text in source.documents(shard))
    tokenizer = train_bpe(texts, args.vocab_size, args.min_frequency)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    print(f"saved {out}: vocab {tokenizer.get_vocab_size()} tokens, end-of-text id {tokenizer.token_to_id(EOT)}")
    return out


if __name__ == "__main__":
    main()
