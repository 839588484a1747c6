"""Data: tokenizers, the built-in corpus, preparation into indexed datasets, datasets, loaders.

Only `tokenizer` and `corpus` are light to import; the rest imports megatron-core on first use.
"""

from pma_train.data.corpus import BUILTIN_CORPUS, builtin_documents, read_jsonl_documents
from pma_train.data.datasets import build_datasets
from pma_train.data.loader import EvalIterator, MicroBatchIterator
from pma_train.data.prefetch import Prefetcher
from pma_train.data.prepare import prepare_builtin_corpus, prepare_indexed_dataset
from pma_train.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "BUILTIN_CORPUS",
    "ByteTokenizer",
    "EvalIterator",
    "HFTokenizer",
    "MicroBatchIterator",
    "Prefetcher",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "builtin_documents",
    "prepare_builtin_corpus",
    "prepare_indexed_dataset",
    "read_jsonl_documents",
]
