"""Tokenize documents into megatron-core's indexed dataset (<prefix>.bin + <prefix>.idx).

The files are the ones Megatron-LM's tools/preprocess_data.py writes (one sequence per document,
EOD appended, uint16 tokens when the vocabulary fits), so data prepared by either tool works in
both. `pma-data` (pma_train/cli/data.py) is the command line; the older

    python -m pma_train.data.prepare --input docs.jsonl.gz notes.txt --output-prefix data/mydocs \
        [--tokenizer path/to/tokenizer.json] [--workers N]

still works and shares everything below with it.

Input files are read streamed, in order: `.jsonl` / `.jsonl.gz` hold one JSON object per line with
the text under a key ("text"); `.txt` / `.txt.gz` hold documents separated by blank lines (see
`read_documents`). Worker processes tokenize batches of documents; this process writes the
batches in input order, so the output is byte-identical for any number of workers, and at most
2 x workers batches are in flight, so memory stays bounded whatever the input size.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pma_train.data.corpus import BUILTIN_CORPUS, builtin_documents, file_digest
from pma_train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
# A batch handed to a worker ends at this many documents or characters, whichever comes first.
BATCH_DOCUMENTS = 256
BATCH_CHARS = 1 << 20


class InputError(ValueError):
    """An input file that cannot be read as documents; the message names the file (and line)."""


# ----------------------------------------------------------------------------- reading


def input_kind(path: str | Path) -> Optional[str]:
    """'jsonl' or 'text' from the file name, None for anything else."""
    name = str(path).lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary file: UTF-8, a leading BOM dropped, "\r\n" read as "\n"."""
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{lineno}: not UTF-8 text ({err.reason})") from None
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if line.endswith("\r\n"):
            line = line[:-2] + "\n"
        yield lineno, line


def _jsonl_documents(lines: Iterator[tuple[int, str]], path: Path, key: str) -> Iterator[str]:
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: not a JSON object ({err.msg})") from None
        if not isinstance(record, dict) or key not in record:
            raise InputError(f"{path}:{lineno}: no '{key}' field (json_key={key})")
        text = record[key]
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: '{key}' is {type(text).__name__}, not a string")
        yield text


def _text_documents(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    document: list[str] = []
    for _, line in lines:
        if line.strip():
            document.append(line)
        elif document:
            yield "".join(document).removesuffix("\n")
            document = []
    if document:
        yield "".join(document).removesuffix("\n")


def read_documents(path: str | Path, json_key: str = "text") -> Iterator[str]:
    """The documents of one input file, in file order, read line by line (never the whole file).

    - .jsonl / .jsonl.gz: the `json_key` string of every non-blank line (one JSON object each).
    - .txt / .txt.gz: documents are separated by blank (empty or whitespace-only) lines; runs of
      blank lines count as one, and a document is its lines as written, without the newline
      after its last line.
    Files are UTF-8 ("\r\n" line ends are read as "\n"). Errors name the file and line.
    """
    path = Path(path)
    kind = input_kind(path)
    if kind is None:
        raise InputError(f"{path}: unsupported file type; expected {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            lines = _lines(f, path)
            yield from _jsonl_documents(lines, path, json_key) if kind == "jsonl" else _text_documents(lines)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise InputError(f"{path}: damaged gzip file ({err})") from None


def read_inputs(paths: Iterable[str | Path], json_key: str = "text") -> Iterator[str]:
    """The documents of several input files, one file after the other."""
    for path in paths:
        yield from read_documents(path, json_key)


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class _Tokenized:
    tokens: np.ndarray  # int32, every kept document followed by EOD, concatenated
    lengths: list[int]  # tokens per kept document, EOD included
    documents: int  # documents in the batch, empty ones included
    empty: int  # empty documents (no tokens): skipped


def _tokenize_batch(tokenizer: Tokenizer, first: int, texts: list[str]) -> _Tokenized:
    """Tokenize one batch; `first` is the input index of its first document (for errors)."""
    flat: list[int] = []
    lengths: list[int] = []
    kept: list[int] = []
    eod = tokenizer.eod
    for i, text in enumerate(texts):
        ids = tokenizer.tokenize(text)
        if not ids:
            continue  # an empty document would be a lone EOD: no text to learn from
        flat.extend(ids)
        flat.append(eod)
        lengths.append(len(ids) + 1)
        kept.append(first + i)
    tokens = np.asarray(flat, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        ends = np.cumsum(lengths)
        bad = int(np.flatnonzero((tokens < 0) | (tokens >= tokenizer.vocab_size))[0])
        doc = kept[int(np.searchsorted(ends, bad, side="right"))]
        raise ValueError(f"token id {int(tokens[bad])} out of range [0, {tokenizer.vocab_size}) in document {doc}")
    # int32 holds any vocabulary and halves what goes back from a worker; the writer converts to the
    # file's dtype (uint16 for vocabularies under 65,500).
    return _Tokenized(tokens.astype(np.int32), lengths, len(texts), len(texts) - len(kept))


def _batches(documents: Iterable[str], batch_documents: int, batch_chars: int) -> Iterator[tuple[int, list[str]]]:
    batch: list[str] = []
    first = chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if len(batch) >= batch_documents or chars >= batch_chars:
            yield first, batch
            first += len(batch)
            batch, chars = [], 0
    if batch:
        yield first, batch


_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(batch: tuple[int, list[str]]) -> _Tokenized:
    return _tokenize_batch(_worker_tokenizer, *batch)


def _tokenized_in_order(batches: Iterator[tuple[int, list[str]]], tokenizer: Tokenizer, workers: int,
                        start_method: Optional[str]) -> Iterator[_Tokenized]:
    """Tokenized batches in input order; with workers > 1, at most 2 x workers batches in flight.

    (Pool.imap would read the whole input ahead into its task queue; submitting batch by batch
    against a bounded queue of pending results keeps memory bounded.)
    """
    if workers <= 1:
        for first, texts in batches:
            yield _tokenize_batch(tokenizer, first, texts)
        return
    if start_method is None:
        # fork starts workers in milliseconds; elsewhere (macOS, Windows) spawn is the safe default.
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(start_method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:  # exit: terminate
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_tokenize_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- writing


@dataclass
class PrepareSummary:
    prefix: str
    documents: int  # written (non-empty) documents
    empty: int  # empty documents skipped
    tokens: int  # tokens written, one EOD per document included
    seconds: float
    workers: int
    dtype: str


class _Writer:
    """megatron-core's IndexedDatasetBuilder, fed a batch of documents at a time.

    `add` leaves the builder exactly as `add_document(doc, [len(doc)])` for each document would
    (same bytes in the .bin, same lengths and document boundaries in the .idx), in one write.
    """

    def __init__(self, prefix: str, vocab_size: int) -> None:
        # Imported here: megatron-core takes seconds to import and the tokenizer alone should not.
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.dtype = DType.optimal_dtype(vocab_size)
        self.builder = IndexedDatasetBuilder(prefix + ".bin", dtype=self.dtype)

    def add(self, tokens: np.ndarray, lengths: list[int]) -> None:
        b = self.builder
        b.data_file.write(tokens.astype(self.dtype).tobytes(order="C"))
        start = len(b.sequence_lengths)
        b.sequence_lengths.extend(lengths)
        b.document_indices.extend(range(start + 1, start + len(lengths) + 1))

    def finalize(self, prefix: str) -> None:
        self.builder.finalize(prefix + ".idx")


def _progress_bar(enabled: bool):
    from tqdm import tqdm

    return tqdm(desc="pma-data", unit=" docs", unit_scale=True, disable=not enabled, mininterval=0.5,
                file=sys.stderr, dynamic_ncols=True)


def write_indexed_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str,
    *,
    workers: int = 1,
    batch_documents: int = BATCH_DOCUMENTS,
    progress: bool = False,
    overwrite: bool = True,
    start_method: Optional[str] = None,
) -> PrepareSummary:
    """Tokenize `documents` (an EOD after each, empty ones skipped) into <output_prefix>.bin/.idx.

    `documents` is consumed lazily. With workers > 1 the tokenizer is handed to worker processes
    (inherited under fork, pickled under spawn). Both files are written under temporary names and
    renamed into place, .idx last, so a reader that sees the .idx always finds a complete pair, even
    if this process is killed midway; on an error nothing is published and an existing dataset of
    that prefix stays as it was. overwrite=False refuses to replace one (FileExistsError).
    """
    output_prefix = str(output_prefix)
    if batch_documents < 1 or workers < 1:
        raise ValueError(f"need workers >= 1 and batch_documents >= 1, got {workers}, {batch_documents}")
    if not overwrite:
        _refuse_existing(output_prefix)
    parent = Path(output_prefix).parent
    created = [d for d in (parent, *parent.parents) if not d.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    published = False
    batches = _batches(documents, batch_documents, BATCH_CHARS)
    results = _tokenized_in_order(batches, tokenizer, workers, start_method)
    writer: Optional[_Writer] = None
    try:
        n_docs = n_empty = n_tokens = 0
        with _progress_bar(progress) as bar:
            for result in results:
                if writer is None:
                    # Made on the first result: the workers tokenize while megatron-core imports, and
                    # an input that fails at once fails before that.
                    writer = _Writer(tmp, tokenizer.vocab_size)
                writer.add(result.tokens, result.lengths)
                n_docs += len(result.lengths)
                n_empty += result.empty
                n_tokens += int(result.tokens.size)
                bar.update(result.documents)
                rate = n_tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{n_tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        if n_docs == 0:
            raise ValueError("no non-empty documents to prepare")
        writer.finalize(tmp)
        if not overwrite:
            _refuse_existing(output_prefix)  # something may have appeared meanwhile
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
        published = True
    finally:
        results.close()  # stops the worker pool at once, also on an error
        if writer is not None:
            writer.builder.data_file.close()  # already closed unless something failed
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        if not published:
            for d in created:  # innermost first; only directories this call made, and only if empty
                try:
                    d.rmdir()
                except OSError:
                    break
    return PrepareSummary(output_prefix, n_docs, n_empty, n_tokens, time.perf_counter() - start, workers,
                          np.dtype(writer.dtype).name)


def _refuse_existing(prefix: str) -> None:
    for suffix in (".idx", ".bin"):
        if os.path.exists(prefix + suffix):
            raise FileExistsError(f"{prefix + suffix} already exists")


def prepare_indexed_dataset(documents: Iterable[str], tokenizer: Tokenizer, output_prefix: str) -> str:
    """Write `documents` (one EOD after each) as <output_prefix>.bin/.idx; returns the prefix.

    In this process, published atomically (.idx last); see `write_indexed_dataset`.
    """
    return write_indexed_dataset(documents, tokenizer, output_prefix).prefix


# ----------------------------------------------------------------------------- built-in corpus


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
    parser = argparse.ArgumentParser(
        description="Tokenize documents into a .bin/.idx pair (see also the pma-data command).")
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl/.jsonl.gz files, or .txt/.txt.gz files of blank-line separated documents")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a local tokenizer.json")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (output is the same for any)")
    args = parser.parse_args(argv)
    for path in args.input:
        if input_kind(path) is None or not os.path.isfile(path):
            parser.error(f"--input: {path} is not an existing .jsonl, .jsonl.gz, .txt or .txt.gz file")
    tokenizer = ByteTokenizer() if args.tokenizer == "byte" else HFTokenizer(args.tokenizer)
    summary = write_indexed_dataset(read_inputs(args.input, args.json_key), tokenizer, args.output_prefix,
                                    workers=args.workers)
    print(f"wrote {summary.prefix}.bin and {summary.prefix}.idx")


if __name__ == "__main__":
    main()
