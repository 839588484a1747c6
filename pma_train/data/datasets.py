"""Train and validation datasets: megatron-core's GPTDataset, blended by BlendedMegatronDatasetBuilder.

Sample i of a dataset is a fixed function of (data, tokenizer, split, weights, seq_length, seed,
num_samples): megatron-core shuffles documents and samples with numpy RNGs seeded by `seed`, and
caches the resulting index arrays under `<cache_dir>/indices`, named by a hash of all of these.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Optional

from torch.utils.data import Dataset

from pma_train.config import DataConfig
from pma_train.data.prepare import prepare_builtin_corpus, resolve_cache_dir
from pma_train.data.tokenizer import Tokenizer


def _blend(data_cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list[str], Optional[list[float]]]:
    if not data_cfg.paths:
        return [prepare_builtin_corpus(tokenizer, data_cfg.cache_dir)], None
    if data_cfg.weights and len(data_cfg.weights) != len(data_cfg.paths):
        raise ValueError(f"data.weights: {len(data_cfg.weights)} weights for {len(data_cfg.paths)} data.paths")
    # Empty weights mean equal weights (not megatron-core's "in proportion to size, one epoch",
    # which would end the blend after one pass over the smallest request).
    weights = [float(w) for w in data_cfg.weights] or [1.0] * len(data_cfg.paths)
    # megatron-core's BlendedDataset asserts every weight > 0; a zero weight means "leave it out".
    kept = [(p, w) for p, w in zip(data_cfg.paths, weights) if w > 0]
    if not kept:
        raise ValueError(f"data.weights: all zero {data_cfg.weights}")
    if len(kept) == 1:
        return [kept[0][0]], None  # a plain GPTDataset, no blending indices to build
    return [p for p, _ in kept], [w for _, w in kept]


def _check_split_not_empty(prefixes: list[str], split: str, split_matrix: list) -> None:
    """megatron-core loops forever building a split that holds no document; fail clearly instead."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        n = len(IndexedDataset(prefix))
        for name, bounds in zip(("train", "valid"), split_matrix[:2]):
            if bounds is None:
                continue
            # The same rounding megatron-core uses to cut the document range.
            begin, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if end <= begin:
                raise ValueError(
                    f"data.split: '{split}' leaves the {name} split of {prefix} without documents "
                    f"(it has {n}); give that split a larger share or the dataset more documents"
                )


def build_datasets(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[int | None, int],
    is_built_on_rank: Callable[[], bool] = lambda: True,
) -> tuple[Optional[Dataset], Optional[Dataset]]:
    """(train, valid) datasets of at least num_samples = (n_train, n_valid) samples each; n_train None
    builds the validation set alone (evaluation), the same one a training run builds.

    A dataset is None where data.split gives it no share (e.g. "100,0,0" has no validation), or
    on ranks where `is_built_on_rank()` is false while a process group exists. Call it on every
    rank when a process group exists: rank 0 builds the index caches first, the others wait at a
    barrier and then read them.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    train_wanted = num_samples[0] is not None
    n_train, n_valid = int(num_samples[0] or 0), int(num_samples[1])
    if seq_length < 1 or n_train < 0 or n_valid < 0:
        raise ValueError(f"need seq_length >= 1 and num_samples >= 0, got {seq_length}, {num_samples}")
    prefixes, weights = _blend(data_cfg, tokenizer)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=data_cfg.split,
        path_to_cache=str(resolve_cache_dir(data_cfg.cache_dir) / "indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The model builds its causal mask itself; a [seq, seq] mask per sample is wasted memory.
        create_attention_mask=False,
    )
    # We never evaluate on the test split; not building it also spares megatron-core's endless loop
    # when the test share rounds to zero documents (e.g. "949,50,1" of a small corpus).
    config.split_matrix[Split.test.value] = None
    if not train_wanted:
        config.split_matrix[Split.train.value] = None
    _check_split_not_empty(prefixes, data_cfg.split, config.split_matrix)

    builder = BlendedMegatronDatasetBuilder(GPTDataset, [n_train, n_valid, 0], is_built_on_rank, config)
    with warnings.catch_warnings():
        # Our tokenizers may set pad == eod on purpose; megatron-core then pads, if ever, with -1
        # and masks it out of the loss, which is what we want, but it warns on every dataset.
        warnings.filterwarnings("ignore", message="The pad token id in the tokenizer collides")
        train, valid, _ = builder.build()
    return train, valid
