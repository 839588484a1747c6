"""Tokenize documents into megatron-core's indexed dataset (<prefix>.bin + <prefix>.idx).

The files are the ones Megatron-LM's tools/preprocess_data.py writes (one sequence per document,
EOD appended, uint16 tokens when the vocabulary fits), so data prepared by either tool works in
both.

    python -m pma_train.data.prepare --input docs.jsonl.gz --output-prefix data/mydocs \
        [--tokenizer path/to/tokenizer.json]
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pma_train.data.corpus import BUILTIN_CORPUS, builtin_documents, file_digest, read_jsonl_documents
from pma_train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def _write(documents: Iterable[str], tokenizer: Tokenizer, prefix: str) -> int:
    # Imported here: megatron-core takes seconds to import and the tokenizer alone should not.
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    count = 0
    for text in documents:
        ids = tokenizer.tokenize(text)
        if not ids:
            continue  # an empty document would be a lone EOD: no text to learn from
        ids.append(tokenizer.eod)
        tokens = np.asarray(ids, dtype=np.int64)
        if tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size:
            raise ValueError(f"token id out of range [0, {tokenizer.vocab_size}) in document {count}")
        builder.add_document(tokens, [tokens.size])
        count += 1
    builder.finalize(prefix + ".idx")
    if count == 0:
        raise ValueError("no non-empty documents to prepare")
    return count


def prepare_indexed_dataset(documents: Iterable[str], tokenizer: Tokenizer, output_prefix: str) -> str:
    """Write `documents` (one EOD after each) as <output_prefix>.bin/.idx; returns the prefix.

    Both files are written under temporary names and renamed into place, .idx last, so a reader
    that sees the .idx always finds a complete pair, even if this process is killed midway.
    """
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(documents, tokenizer, tmp)
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
    return output_prefix


def resolve_cache_dir(cache_dir: str) -> Path:
    """`data.cache_dir` as a path; refuses an OmegaConf interpolation nobody resolved."""
    if "${" in cache_dir:
        # A DataConfig made directly in Python keeps the default's "${oc.env:...}" text, which
        # would otherwise become a directory of that literal name.
        raise ValueError(f"data.cache_dir: '{cache_dir}' is unresolved; pass a path or resolve the config")
    return Path(os.path.expanduser(cache_dir))


def _is_prepared(prefix: str) -> bool:
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


def prepare_builtin_corpus(tokenizer: Tokenizer, cache_dir: str) -> str:
    """The built-in corpus as an indexed dataset under `cache_dir`; returns its prefix.

    Cached by corpus content and tokenizer identity, so a changed corpus or tokenizer never reuses
    stale tokens. Every rank of a job may call this at once: a file lock lets one of them tokenize
    while the others wait, and the atomic publish above keeps it safe even where the filesystem
    ignores locks (the ranks then write identical files).
    """
    from filelock import FileLock  # a dependency of torch

    digest = file_digest(BUILTIN_CORPUS)[:12]
    root = resolve_cache_dir(cache_dir) / "builtin"
    root.mkdir(parents=True, exist_ok=True)
    prefix = str(root / f"{BUILTIN_CORPUS.name.split('.')[0]}-{digest}-{tokenizer.identity}")
    if _is_prepared(prefix):
        return prefix
    with FileLock(prefix + ".lock"):
        if not _is_prepared(prefix):
            prepare_indexed_dataset(builtin_documents(), tokenizer, prefix)
    return prefix


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize JSONL documents into a .bin/.idx pair.")
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or .jsonl.gz files")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local tokenizer.json")
    args = parser.parse_args(argv)
    tokenizer = ByteTokenizer() if args.tokenizer == "byte" else HFTokenizer(args.tokenizer)
    docs = (doc for path in args.input for doc in read_jsonl_documents(path, args.json_key))
    prefix = prepare_indexed_dataset(docs, tokenizer, args.output_prefix)
    print(f"wrote {prefix}.bin and {prefix}.idx")


if __name__ == "__main__":
    main()
