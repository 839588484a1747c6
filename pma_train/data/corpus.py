"""The built-in corpus, and reading documents from JSONL files.

The built-in corpus ships inside the package (see builtin/README.md) so that the default job and
the tests need no download: 18 public-domain works, about 2.3 MB of English text in 557
documents of about 4 KB.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

BUILTIN_CORPUS = Path(__file__).with_name("builtin") / "shakespeare.jsonl.gz"


def read_jsonl_documents(path: str | Path, key: str = "text") -> Iterator[str]:
    """The `key` field of every line of a .jsonl or .jsonl.gz file, in file order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if key not in record:
                raise KeyError(f"{path}:{lineno} has no '{key}' field")
            yield record[key]


def builtin_documents() -> Iterator[str]:
    return read_jsonl_documents(BUILTIN_CORPUS)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: a prepared copy is reused only while its source is unchanged."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
