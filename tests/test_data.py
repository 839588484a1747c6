"""pma_train.data: built-in corpus, tokenizers, .bin/.idx preparation, datasets, loaders."""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from pma_train.config import DataConfig, TokenizerConfig
from pma_train.data import (
    BUILTIN_CORPUS,
    ByteTokenizer,
    EvalIterator,
    MicroBatchIterator,
    build_datasets,
    build_tokenizer,
    builtin_documents,
    prepare_builtin_corpus,
    prepare_indexed_dataset,
)
from pma_train.slurm_env import free_port

SEQ = 64


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def byte_tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def builtin_prefix(tmp_path_factory, byte_tok) -> str:
    return prepare_builtin_corpus(byte_tok, str(tmp_path_factory.mktemp("cache")))


def _letters_docs(n: int) -> list[str]:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    return [" ".join(words[(i + j) % len(words)] for j in range(40 + i)) + "\n" for i in range(n)]


def _digit_docs(n: int) -> list[str]:
    return ["".join(str((i * 7 + j) % 10) for j in range(200 + i)) + "\n" for i in range(n)]


@pytest.fixture(scope="module")
def two_prefixes(tmp_path_factory, byte_tok) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("blend")
    letters = prepare_indexed_dataset(_letters_docs(60), byte_tok, str(root / "letters"))
    digits = prepare_indexed_dataset(_digit_docs(60), byte_tok, str(root / "digits"))
    return letters, digits


def _samples(ds, n: int) -> list[list[int]]:
    return [ds[i]["tokens"].tolist() for i in range(n)]


# ----------------------------------------------------------------------------- corpus


def test_builtin_corpus_is_real_english_text_of_the_expected_size():
    assert BUILTIN_CORPUS.stat().st_size < 2_000_000
    docs = list(builtin_documents())
    total = sum(len(d) for d in docs)
    assert 500 <= len(docs) <= 700
    assert 2_000_000 <= total <= 3_000_000
    assert all(1_000 <= len(d) <= 10_000 for d in docs)
    text = "\n".join(docs)
    assert "To be, or not to be" in text
    assert "Shall I compare thee to a summer's day?" in text
    assert "gutenberg" not in text.lower()
    words = text.lower().split()
    # English prose: the commonest words dominate as they do in any English text.
    for common in ("the", "and", "to", "of", "i", "you"):
        assert words.count(common) > 2_000, common
    # Every line of the shipped file is a JSON object with a text field.
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as f:
        assert all("text" in json.loads(line) for line in f)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips(byte_tok):
    tok = build_tokenizer(TokenizerConfig(type="byte"))
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eod) == (257, 256)
    for text in ["", "Hello, world!\n", "naïve café — 日本語 🙂", "  trailing space \n\n", "\x00nul"]:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.detokenize(ids) == text
    assert tok.detokenize(tok.tokenize("ab") + [tok.eod] + tok.tokenize("cd")) == "abcd"


def _train_hf_tokenizer(path, specials):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + _letters_docs(5), trainer)
    hf.save(str(path))
    return hf


def test_hf_tokenizer_loads_a_local_tokenizer_json_and_round_trips(tmp_path):
    path = tmp_path / "tokenizer.json"
    hf = _train_hf_tokenizer(path, ["<|endoftext|>", "<pad>"])
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=str(path)))
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.eod == hf.token_to_id("<|endoftext|>")
    assert tok.pad == hf.token_to_id("<pad>")
    for text in ["the quick brown fox", "Unseen words: zebra, 42!\n", "naïve 日本語  spaces "]:
        ids = tok.tokenize(text)
        assert tok.eod not in ids
        assert tok.detokenize(ids) == text
    # Merges were learnt: common words take fewer tokens than bytes.
    assert len(tok.tokenize("the quick brown fox")) < len("the quick brown fox")
    assert tok.identity.startswith("hf-") and tok.identity != ByteTokenizer.identity


def test_hf_tokenizer_errors_name_the_problem(tmp_path):
    path = tmp_path / "tokenizer.json"
    _train_hf_tokenizer(path, ["<unk>"])
    with pytest.raises(ValueError, match="end-of-document"):
        build_tokenizer(TokenizerConfig(type="huggingface", path=str(path)))
    with pytest.raises(FileNotFoundError, match="data.tokenizer.path"):
        build_tokenizer(TokenizerConfig(type="huggingface", path=str(tmp_path / "missing.json")))


# ----------------------------------------------------------------------------- preparation


def test_prepared_bin_idx_holds_the_tokenized_documents_plus_eod(tmp_path, byte_tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["First document.\n", "", "Second — with ünïcode.\n", "Third\n\nwith paragraphs.\n"]
    prefix = prepare_indexed_dataset(docs, byte_tok, str(tmp_path / "sub" / "docs"))
    ds = IndexedDataset(prefix)
    kept = [d for d in docs if d]  # an empty document is skipped
    assert len(ds) == len(kept)
    assert ds.index.dtype == np.uint16
    for i, doc in enumerate(kept):
        assert ds[i].tolist() == byte_tok.tokenize(doc) + [byte_tok.eod]
    assert sorted(os.listdir(tmp_path / "sub")) == ["docs.bin", "docs.idx"]  # no temp files left


def _prepare_in_child(cache_dir: str, queue) -> None:
    queue.put(prepare_builtin_corpus(ByteTokenizer(), cache_dir))


def test_prepare_builtin_corpus_is_cached_and_safe_for_concurrent_ranks(tmp_path, builtin_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    prefixes = {queue.get(timeout=60) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(prefixes) == 1
    (prefix,) = prefixes
    with open(prefix + ".bin", "rb") as a, open(builtin_prefix + ".bin", "rb") as b:
        assert a.read() == b.read()
    leftovers = [f for f in os.listdir(os.path.dirname(prefix)) if ".tmp-" in f]
    assert leftovers == []
    # A second call reuses the files instead of writing them again.
    mtime = os.stat(prefix + ".idx").st_mtime_ns
    assert prepare_builtin_corpus(ByteTokenizer(), str(tmp_path)) == prefix
    assert os.stat(prefix + ".idx").st_mtime_ns == mtime
    ds = IndexedDataset(prefix)
    docs = list(builtin_documents())
    assert len(ds) == len(docs)
    assert ds[0].tolist() == ByteTokenizer().tokenize(docs[0]) + [256]


# ----------------------------------------------------------------------------- datasets


def test_datasets_are_deterministic_for_a_seed_and_differ_for_another(tmp_path, byte_tok, builtin_prefix):
    def build(seed, cache):
        cfg = DataConfig(paths=[builtin_prefix], cache_dir=str(tmp_path / cache))
        return build_datasets(cfg, byte_tok, SEQ, seed, (500, 50))

    train_a, valid_a = build(1, "a")
    train_b, valid_b = build(1, "b")  # fresh index cache: rebuilt, not re-read
    train_c, _ = build(2, "c")
    assert len(train_a) >= 500 and len(valid_a) >= 50
    assert _samples(train_a, 20) == _samples(train_b, 20)
    assert _samples(valid_a, 20) == _samples(valid_b, 20)
    assert _samples(train_a, 20) != _samples(train_c, 20)
    sample = train_a[0]
    assert sample["tokens"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # labels = tokens shifted by one
    # The split is by document: no validation sample's text occurs in the training text.
    train_text = set(byte_tok.detokenize(t) for t in _samples(train_a, len(train_a)))
    assert not train_text & set(byte_tok.detokenize(t) for t in _samples(valid_a, len(valid_a)))


def test_builtin_corpus_is_the_default_dataset(tmp_path, byte_tok):
    train, valid = build_datasets(DataConfig(cache_dir=str(tmp_path)), byte_tok, SEQ, 1234, (100, 10))
    text = byte_tok.detokenize(train[0]["tokens"].tolist())
    assert len(text) > SEQ // 2 and text.isascii()
    assert valid is not None and len(valid) >= 10


def test_blend_weights_choose_the_sources(tmp_path, byte_tok, two_prefixes):
    letters, digits = two_prefixes
    digit_ids = set(b"0123456789")

    def build(weights):
        cfg = DataConfig(paths=[letters, digits], weights=weights, split="90,10,0", cache_dir=str(tmp_path))
        return build_datasets(cfg, byte_tok, SEQ, 7, (400, 20))[0]

    only_first = build([1.0, 0.0])
    tokens = {t for s in _samples(only_first, 400) for t in s}
    assert not tokens & digit_ids

    mixed = build([3.0, 1.0])
    ids = [int(mixed[i]["dataset_id"]) for i in range(400)]
    assert 0.65 < ids.count(0) / 400 < 0.85
    tokens = {t for s in _samples(mixed, 400) for t in s}
    assert tokens & digit_ids and tokens & set(b"abcdefgh")


def test_bad_split_or_cache_dir_fails_clearly(tmp_path, byte_tok):
    prefix = prepare_indexed_dataset(_letters_docs(5), byte_tok, str(tmp_path / "five"))
    # 1% of 5 documents rounds to none; megatron-core would loop forever building it.
    cfg = DataConfig(paths=[prefix], split="99,1,0", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.split"):
        build_datasets(cfg, byte_tok, SEQ, 1, (10, 10))
    with pytest.raises(ValueError, match="data.cache_dir"):
        build_datasets(DataConfig(paths=[prefix]), byte_tok, SEQ, 1, (10, 10))  # unresolved default
    train, valid = build_datasets(DataConfig(paths=[prefix], split="100,0,0", cache_dir=str(tmp_path)),
                                  byte_tok, SEQ, 1, (10, 0))
    assert valid is None and len(train) >= 10


def _build_under_gloo(rank: int, port: int, prefix: str, cache: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train, valid = build_datasets(DataConfig(paths=[prefix], cache_dir=cache), ByteTokenizer(), SEQ, 3, (200, 20))
        queue.put((rank, _samples(train, 10), _samples(valid, 5)))
    finally:
        torch.distributed.destroy_process_group()


def test_build_datasets_under_a_gloo_process_group(tmp_path, byte_tok, builtin_prefix):
    port = free_port()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_under_gloo, args=(r, port, builtin_prefix, str(tmp_path / "pg"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (t, v)) for r, t, v in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    train, valid = build_datasets(DataConfig(paths=[builtin_prefix], cache_dir=str(tmp_path / "nopg")),
                                  byte_tok, SEQ, 3, (200, 20))
    assert results[0] == results[1] == (_samples(train, 10), _samples(valid, 5))


# ----------------------------------------------------------------------------- loaders


class _Numbered(torch.utils.data.Dataset):
    """Sample i is the constant sequence i, so a batch shows which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        t = torch.full((8,), i, dtype=torch.long)
        return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(8), "position_ids": torch.arange(8),
                "dataset_id": 0}


def _ids(batch) -> list[int]:
    return batch["tokens"][:, 0].tolist()


def _take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def test_loader_follows_megatron_lm_sample_order():
    ds = _Numbered(1000)
    rank1 = MicroBatchIterator(ds, micro_batch_size=2, dp_rank=1, dp_size=3, consumed_samples=12)
    # chunks of mbs*dp = 6 samples from 12; rank 1 takes the second pair of each chunk
    assert [_ids(b) for b in _take(rank1, 3)] == [[14, 15], [20, 21], [26, 27]]
    assert rank1.consumed_samples == 12 + 3 * 6
    batch = next(MicroBatchIterator(ds, 2, 0, 1))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert all(v.shape == (2, 8) for v in batch.values())


def test_resumed_loader_sees_what_an_uninterrupted_one_sees(tmp_path, byte_tok, builtin_prefix):
    train, _ = build_datasets(DataConfig(paths=[builtin_prefix], cache_dir=str(tmp_path)), byte_tok, SEQ, 5, (300, 10))
    mbs, k = 3, 6
    full = MicroBatchIterator(train, mbs, 0, 1, consumed_samples=0)
    skipped = _take(full, k // mbs)
    resumed = MicroBatchIterator(train, mbs, 0, 1, consumed_samples=k)
    after_k, from_k = _take(full, 4), _take(resumed, 4)
    for a, b in zip(after_k, from_k):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key])
    assert full.consumed_samples == resumed.consumed_samples == k + 4 * mbs
    assert not torch.equal(skipped[0]["tokens"], from_k[0]["tokens"])
    assert torch.equal(from_k[0]["tokens"][0], train[k]["tokens"])


def test_data_parallel_ranks_together_cover_the_single_rank_order():
    ds = _Numbered(1000)
    single = [_ids(b) for b in _take(MicroBatchIterator(ds, 2, 0, 1, consumed_samples=8), 8)]
    ranks = [[_ids(b) for b in _take(MicroBatchIterator(ds, 2, r, 2, consumed_samples=8), 4)] for r in range(2)]
    interleaved = [ids for step in zip(*ranks) for ids in step]
    assert interleaved == single
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))


def test_loader_cycles_past_the_end_and_workers_keep_the_order():
    ds = _Numbered(10)
    it = MicroBatchIterator(ds, 4, 0, 1, consumed_samples=4)
    assert [_ids(b) for b in _take(it, 3)] == [[4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    ds = _Numbered(50)
    plain = [_ids(b) for b in _take(MicroBatchIterator(ds, 3, 1, 2, consumed_samples=6), 10)]
    workers = [_ids(b) for b in _take(MicroBatchIterator(ds, 3, 1, 2, consumed_samples=6, num_workers=2), 10)]
    assert plain == workers


def test_eval_iterator_restarts_at_sample_zero():
    ev = EvalIterator(_Numbered(100), micro_batch_size=2, dp_rank=1, dp_size=2, num_micro_batches=3)
    first = [_ids(b) for b in ev]
    assert first == [[2, 3], [6, 7], [10, 11]]
    assert [_ids(b) for b in ev] == first


def test_loader_workers_outlive_a_signal_sent_to_the_whole_job():
    # Slurm signals every process of a job step: the trainer saves before stopping, and its loader
    # workers (forked before its handlers exist) must keep serving batches meanwhile.
    import multiprocessing
    import os
    import signal
    import time

    ds = _Numbered(50)
    it = MicroBatchIterator(ds, 2, 0, 1, num_workers=2)
    first = _take(it, 2)  # one from each worker: both are set up
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)  # the signal is delivered at once; its default action would have ended them
    assert all(w.is_alive() for w in workers)
    assert [_ids(b) for b in first + _take(it, 4)] == [[2 * i, 2 * i + 1] for i in range(6)]
