"""`pma-data`: own corpora into megatron-core indexed datasets, run as real processes."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pma_train.data.tokenizer import ByteTokenizer, HFTokenizer
from tests import launch
from tests.launch import REPO, train

PMA_DATA = Path(sys.executable).with_name("pma-data")


def pma_data_cmd(args: list[str]) -> list[str]:
    # The installed console script when there is one (the public command), else the module.
    cmd = [str(PMA_DATA)] if PMA_DATA.exists() else [sys.executable, "-m", "pma_train.cli.data"]
    return cmd + ["progress_bar=false", *args]


def pma_data(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(pma_data_cmd(args), cwd=REPO, env=launch.test_env(), capture_output=True, text=True,
                          timeout=300)


def _jsonl_docs() -> list[str]:
    words = ["river", "stone", "naïve", "café", "日本語", "🙂", "lantern", "quiet", "harbour", "\t"]
    docs = [" ".join(words[(i * 3 + j) % len(words)] for j in range(20 + i % 50)) for i in range(240)]
    docs[7] = ""  # an empty document: skipped
    docs[8] = "Two paragraphs in JSON.\n\nThe second one.\n"  # blank lines inside a JSON text are kept
    docs[9] = "   "  # whitespace is text for the byte tokenizer
    return docs


def _text_docs() -> list[str]:
    return [f"Paragraph {i} begins here.\n  an indented line {i * i}\nand a last line — {i % 7}" for i in range(120)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    jsonl_docs, text_docs = _jsonl_docs(), _text_docs()
    with gzip.open(root / "web.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, doc in enumerate(jsonl_docs):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
            if i == 100:
                f.write("\n")  # a blank line between records is no document
    separators = ["\n\n", "\n\n\n", "\n   \n", "\n\t\n\n"]  # runs of blank / whitespace-only lines
    with open(root / "notes.txt", "w", encoding="utf-8") as f:
        f.write("\n\n")  # leading blank lines: no document
        for i, doc in enumerate(text_docs):
            f.write(doc + (separators[i % len(separators)] if i < len(text_docs) - 1 else ""))
    return {"root": root, "inputs": [str(root / "web.jsonl.gz"), str(root / "notes.txt")],
            "documents": jsonl_docs + text_docs}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> dict:
    """The corpus prepared by pma-data with 1 and with 4 workers (small batches: many in flight)."""
    out = tmp_path_factory.mktemp("prepared")
    inputs = "inputs=[" + ",".join(corpus["inputs"]) + "]"
    runs = {n: subprocess.Popen(pma_data_cmd([inputs, f"output_prefix={out / f'w{n}' / 'corpus'}", f"workers={n}",
                                              *(["batch_size=8"] if n > 1 else [])]),
                                cwd=REPO, env=launch.test_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n in (1, 4)}
    outputs = {n: p.communicate(timeout=300) for n, p in runs.items()}
    for n, p in runs.items():
        assert p.returncode == 0, f"pma-data workers={n} failed:\n{outputs[n][0]}\n{outputs[n][1]}"
    return {n: str(out / f"w{n}" / "corpus") for n in runs} | {"stdout": outputs[1][0]}


def _read(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_output_is_byte_identical_for_any_workers_and_holds_each_document_plus_eod(corpus, prepared, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    assert _read(prepared[1]) == _read(prepared[4])
    tok = ByteTokenizer()
    expected = [tok.tokenize(d) + [tok.eod] for d in corpus["documents"] if d]
    assert len(expected) == len(corpus["documents"]) - 1  # only the empty document is left out
    ds = IndexedDataset(prepared[1])
    assert len(ds) == len(expected)
    assert ds.index.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert ds.document_indices.tolist() == list(range(len(expected) + 1))  # one sequence per document
    # Exactly what megatron-core's own builder writes, one add_document call per document.
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for ids in expected:
        builder.add_document(np.asarray(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert _read(prepared[1]) == _read(str(tmp_path / "ref"))
    assert f"{len(expected):,} documents, 1 empty skipped, {sum(map(len, expected)):,} tokens" in prepared["stdout"]
    assert sorted(os.listdir(Path(prepared[4]).parent)) == ["corpus.bin", "corpus.idx"]  # no temporary files


def test_pma_train_trains_on_the_prepared_data(prepared, tmp_path):
    run = train(tmp_path / "run", ["model=tiny", "train.iters=4", "train.log_interval=1", "train.eval_interval=4",
                                   "train.eval_iters=1", "train.global_batch_size=4", "train.micro_batch_size=2",
                                   "train.seq_length=32", "schedule.warmup_iters=1", "checkpoint.interval=100",
                                   "checkpoint.save_at_end=false", f"data.paths=[{prepared[4]}]"],
                nproc=None, cache_dir=tmp_path / "cache")
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3, 4], run.output[-3000:]
    assert all(math.isfinite(v) and 0 < v < 10 for v in losses.values()), losses
    assert all(math.isfinite(v) for v in run.val_losses().values()) and run.val_losses()


def _snapshot(prefix: str) -> tuple:
    return tuple((Path(prefix + s).read_bytes(), os.stat(prefix + s).st_mtime_ns) for s in (".bin", ".idx"))


def test_bad_input_fails_clearly_and_writes_nothing(corpus, prepared, tmp_path):
    inputs = "inputs=[" + ",".join(corpus["inputs"]) + "]"
    fresh = tmp_path / "new" / "out"

    missing = str(corpus["root"] / "missing.jsonl")
    proc = pma_data([f"inputs=[{corpus['inputs'][1]},{missing}]", f"output_prefix={fresh}"])
    assert proc.returncode != 0 and f"pma-data: error: inputs: {missing} does not exist" in proc.stderr
    (corpus["root"] / "empty.txt").write_text("")
    proc = pma_data([f"inputs=[{corpus['root'] / 'empty.txt'}]", f"output_prefix={fresh}"])
    assert proc.returncode != 0 and "empty.txt is empty" in proc.stderr
    proc = pma_data([inputs, f"output_prefix={fresh}", "tokenizer.type=huggingface",
                     f"tokenizer.path={tmp_path / 'nope.json'}"])
    assert proc.returncode != 0 and f"tokenizer.path: no tokenizer.json at {tmp_path / 'nope.json'}" in proc.stderr
    assert not (tmp_path / "new").exists()

    # An existing output is refused without overwrite=true, and stays as it was.
    existing = prepared[1]
    before = _snapshot(existing)
    proc = pma_data([f"inputs=[{corpus['inputs'][1]}]", f"output_prefix={existing}"])
    assert proc.returncode != 0
    assert f"output_prefix: {existing}.idx already exists; pass overwrite=true" in proc.stderr
    # A file that turns out bad midway (line 3 lacks the key) fails even with overwrite=true, naming
    # file and line, and publishes nothing: the existing output is untouched, no temporary file is left.
    bad = corpus["root"] / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text key"}\n')
    proc = pma_data([f"inputs=[{corpus['inputs'][1]},{bad}]", f"output_prefix={existing}", "overwrite=true",
                     "workers=2"])
    assert proc.returncode != 0 and f"{bad}:3: no 'text' field" in proc.stderr, proc.stderr
    assert _snapshot(existing) == before
    assert sorted(os.listdir(Path(existing).parent)) == ["corpus.bin", "corpus.idx"]


def _train_hf_tokenizer(path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_text_docs() + _jsonl_docs(), trainer)
    hf.save(str(path))


def test_hf_tokenizer_in_worker_processes_and_the_module_entry_point(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from pma_train.data.prepare import main as prepare_main
    from pma_train.data.prepare import read_inputs, write_indexed_dataset

    _train_hf_tokenizer(tmp_path / "tokenizer.json")
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    one = write_indexed_dataset(read_inputs(corpus["inputs"]), tok, str(tmp_path / "one"), workers=1)
    two = write_indexed_dataset(read_inputs(corpus["inputs"]), tok, str(tmp_path / "two"), workers=2,
                                batch_documents=16)
    assert _read(one.prefix) == _read(two.prefix)
    expected = [tok.tokenize(d) + [tok.eod] for d in corpus["documents"] if d]
    ds = IndexedDataset(two.prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert (two.documents, two.empty, two.tokens) == (len(expected), 1, sum(map(len, expected)))
    assert sum(map(len, expected)) < sum(len(d.encode()) + 1 for d in corpus["documents"] if d)  # merges applied
    # The older `python -m pma_train.data.prepare` shares the reader and the writer.
    prepare_main(["--input", *corpus["inputs"], "--output-prefix", str(tmp_path / "legacy"),
                  "--tokenizer", str(tmp_path / "tokenizer.json"), "--workers", "2"])
    assert _read(str(tmp_path / "legacy")) == _read(one.prefix)
