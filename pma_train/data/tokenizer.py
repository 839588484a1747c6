"""Tokenizers: UTF-8 bytes (no files needed) and a local Hugging Face tokenizer.json.

Both satisfy the small interface megatron-core's GPTDataset reads from a tokenizer (`vocab_size`,
`eod`, `pad`, `unique_identifiers`) plus `tokenize` / `detokenize` for preparation and samples.
`vocab_size` is the true size; the model pads it to `make_vocab_size_divisible_by` itself.

megatron-core's own `ByteLevelTokenizer` is not used: its `ids_to_text` right-strips the text (so
decode(encode(s)) != s for text ending in whitespace), its default EOS id 0 is the NUL byte, and
it comes through the metadata-file machinery of `MegatronTokenizer`. Its HF wrapper needs
`transformers`; we only need the much smaller `tokenizers` package.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Protocol, runtime_checkable

from pma_train.config import TokenizerConfig


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    pad: int
    # A short string that changes whenever token ids could change: keys the prepared-data cache.
    identity: str

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...


def _unique_identifiers(tok: Tokenizer) -> OrderedDict:
    # megatron-core hashes the dataset description, tokenizer included, into its index-cache file
    # names; it serialises the tokenizer through this attribute.
    return OrderedDict([("class", type(tok).__name__), ("identity", tok.identity)])


class ByteTokenizer:
    """Token = UTF-8 byte (0..255); 256 ends a document. Lossless for any text."""

    vocab_size = 257
    eod = 256
    # No padding token of its own: megatron-core treats pad == eod as "no pad id" and pads, if ever,
    # with a value that never occurs in data (see datasets.py).
    pad = 256
    identity = "byte-v1"

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        # Special ids have no text; a sample can start or end mid-character, hence "replace".
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def unique_identifiers(self) -> OrderedDict:
        return _unique_identifiers(self)


# Tried in order to find the end-of-document token of a pre-trained tokenizer.
_EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end|>")
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer read from a local tokenizer.json (never downloaded)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:
            raise ImportError(
                "data.tokenizer.type=huggingface needs the 'tokenizers' package: "
                "pip install 'pma-train[hf]' (or pip install tokenizers)"
            ) from err
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer.path: no tokenizer.json at {path}")
        self.path = str(path)
        self._tok = _HFTokenizer.from_file(self.path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Ids may have gaps; the embedding needs a row for the largest one.
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        self.eod = self._find(vocab, _EOD_CANDIDATES, "end-of-document")
        pad = next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), None)
        self.pad = self.eod if pad is None else pad
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.identity = f"hf-{digest}"

    def _find(self, vocab: dict[str, int], candidates: tuple[str, ...], what: str) -> int:
        for token in candidates:
            if token in vocab:
                return vocab[token]
        special = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        raise ValueError(
            f"data.tokenizer.path: {self.path} has no {what} token among {list(candidates)}; "
            f"its special tokens are {special}"
        )

    def tokenize(self, text: str) -> list[int]:
        # No BOS/EOS from the post-processor: preparation appends exactly one EOD per document.
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def unique_identifiers(self) -> OrderedDict:
        return _unique_identifiers(self)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.type == "byte":
        return ByteTokenizer()
    if cfg.type == "huggingface":
        if not cfg.path:
            raise ValueError("data.tokenizer.path: a local tokenizer.json is required for type=huggingface")
        return HFTokenizer(cfg.path)
    raise ValueError(f"data.tokenizer.type: '{cfg.type}' is not one of byte, huggingface")
