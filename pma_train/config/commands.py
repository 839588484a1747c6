"""The schemas of the commands other than pma-train: pma-eval (a pma-train job config plus checkpoints),
pma-data and pma-merge. Validated in checks.py (validate_eval, validate_merge) and cli/data.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pma_train.config.schema import JobConfig, MergeWeighting, TokenizerConfig


@dataclass
class EvalConfig(JobConfig):
    """`pma-eval`: validation loss of checkpoints under a pma-train job config (model, data, parallel,
    train.eval_iters / micro_batch_size / seq_length), the same numbers the trainer logs."""

    # Checkpoint roots or iter_* dirs, any parallel layout.
    checkpoints: list[str] = field(default_factory=list)
    # Also write the results as JSON here.
    output: Optional[str] = None


@dataclass
class DataPrepConfig:
    """`pma-data`: tokenize documents into <output_prefix>.bin/.idx (megatron-core indexed dataset)."""

    # Input files, read in this order, streamed: .jsonl / .jsonl.gz (one JSON object per line, the
    # text under `json_key`) or .txt / .txt.gz (documents separated by blank lines).
    inputs: list[str] = field(default_factory=list)
    json_key: str = "text"
    # Writes <output_prefix>.bin and <output_prefix>.idx; give pma-train data.paths=[<output_prefix>].
    output_prefix: Optional[str] = None
    # Replace an existing <output_prefix>.bin/.idx.
    overwrite: bool = False
    # type=byte (UTF-8 bytes, no file) | huggingface with path=<local tokenizer.json>; the same
    # settings as pma-train's data.tokenizer, which must match when training on the output.
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Tokenizing processes; null = the CPUs this process may use. The output is byte-identical for any number.
    workers: Optional[int] = None
    # Documents per batch handed to a worker (a batch also ends at 1 MiB of text).
    batch_size: int = 256
    # A tqdm bar (documents, tokens/s) on stderr when it is a terminal.
    progress_bar: bool = True


@dataclass
class MergeConfig(MergeWeighting):
    """`pma-merge`: average checkpoints (PMA). Inputs are explicit dirs, or a root plus a selection."""

    # Explicit checkpoint directories (iter_* dirs or roots; merged oldest first whatever the order listed,
    # each checkpoint once) ...
    inputs: list[str] = field(default_factory=list)
    # ... or a checkpoint root: the last `n` checkpoints spaced `v_tokens` (or `v_iterations`) apart,
    # the newest at or before `end_iteration` (default: the root's latest).
    root: Optional[str] = None
    n: int = 10
    v_tokens: Optional[int] = None
    v_iterations: Optional[int] = None
    end_iteration: Optional[int] = None
    # DeepSpeed inputs record samples, not tokens: their tokens (v_tokens, provenance) = the recorded
    # global_samples x this sequence length. Not used for torch_dist inputs (they record tokens).
    seq_length: Optional[int] = None
    # method=explicit (besides MergeWeighting's): these weights, one per input in the order inputs are
    # listed (a weight moves with its input when inputs are sorted oldest first); with root, oldest first.
    weights: list[float] = field(default_factory=list)
    normalize: bool = True
    allow_negative_weights: bool = False
    # Output checkpoint root: <output>/iter_XXXXXXX (the newest input's iteration) + latest tracker.
    output: Optional[str] = None
    overwrite: bool = False
    # One merge writes `output` at a time (lock file <output>/.pma-lock); take over a lock another
    # host left behind (that host's merge must no longer run: this host cannot check).
    force_unlock: bool = False
    # Refuse before reading anything when the output's file system lacks room for the merged tensors
    # (a DeepSpeed output: the newest input's files it rewrites).
    check_free_space: bool = True
    # Per-rank memory for merge buffers; pieces of tensors are sized to fit.
    memory_budget_mb: int = 256
    # Accumulation precision fp32 | fp64; output dtype: "input" keeps each tensor's dtype.
    accumulate_dtype: str = "fp32"
    output_dtype: str = "input"
    # input (the inputs' format) | torch_dist: DeepSpeed inputs (of a DeepSpeed engine wrapping pma-train's
    # model) merged into a pma-train checkpoint that checkpoint.init_from and pma-export read (fp32 master
    # weights unless output_dtype says otherwise; no optimizer state).
    output_format: str = "input"
    # Carry the optimizer state so training resumes from the merge: main params merged, moments of the newest input.
    carry_optimizer: bool = False
    # Print the selection and weights, merge nothing.
    dry_run: bool = False
    progress_bar: bool = True
