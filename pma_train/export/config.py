"""`pma-export`'s typed config (hydra composes it with export.yaml and the model presets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from pma_train.config import ModelConfig, TokenizerConfig


@dataclass
class ExportConfig:
    """Convert a pma-train checkpoint (any TP / PP / EP layout, or a pma-merge output) to a Hugging Face
    model directory: config.json + safetensors shards (+ index), loadable with from_pretrained."""

    # Checkpoint root (its latest) or iter_* directory.
    checkpoint: Optional[str] = None
    # Output directory (must not exist, unless overwrite=true and it holds a previous export).
    output: Optional[str] = None
    # The model preset the checkpoint was trained with (model=<name of model_configs/*.yaml>; model.*
    # overrides as in pma-train). Checked against the run's recorded args and every tensor shape.
    model: Optional[ModelConfig] = None
    # auto | llama | mixtral | ernie4_5_moe (auto: llama for dense models, mixtral for MoE without shared
    # expert or dense layers, ernie4_5_moe otherwise)
    target: str = "auto"
    # The tokenizer the run used: its vocabulary size (padding rows are dropped) and end-of-document id;
    # a huggingface tokenizer is also saved into the output.
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # The real vocabulary size, when the tokenizer is not at hand (then no token ids go into config.json).
    vocab_size: Optional[int] = None
    # Keep the padded vocabulary (config.json then says the padded size).
    keep_padded_vocab: bool = False
    # auto (the checkpoint's dtype) | fp32 | bf16 | fp16
    dtype: str = "auto"
    # Largest shard: 2GB (decimal, as Hugging Face), 500MB, 512MiB, or bytes.
    max_shard_size: str = "2GB"
    overwrite: bool = False
    # One export writes `output` at a time (lock file <output's parent>/.pma-lock.<output's name>); take
    # over a lock another host left behind, once you know that export no longer runs.
    force_unlock: bool = False
    # Print the target, config and shard plan; write nothing.
    dry_run: bool = False


DTYPES = ("auto", "fp32", "bf16", "fp16")
