"""`pma-data`: tokenize your own corpus into a megatron-core indexed dataset (hydra).

    pma-data 'inputs=[corpus/a.jsonl.gz,corpus/b.txt]' output_prefix=data/mycorpus workers=8

writes data/mycorpus.bin + data/mycorpus.idx, which pma-train reads with data.paths=[data/mycorpus].
The heavy lifting (streamed reading, worker processes, ordered atomic writing) is in
pma_train.data.prepare; this module holds the schema, the checks done before any work, and the
messages.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pma_train.conf import CONF_DIR, register_configs
from pma_train.config import DataPrepConfig, TokenizerConfig, to_config

# Must match pma_train.data.prepare (not imported here: it pulls in torch, and --help and the
# checks should answer at once).
_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


class DataPrepError(ValueError):
    """A pma-data setting that cannot work; the message names the field."""


def _fail_field(name: str, message: str) -> None:
    raise DataPrepError(f"{name}: {message}")


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _check_input(path: str) -> None:
    p = Path(path)
    if not path.lower().endswith(_SUFFIXES):
        _fail_field("inputs", f"{path}: unsupported file type; expected {', '.join(_SUFFIXES)}")
    if not p.exists():
        _fail_field("inputs", f"{path} does not exist")
    if not p.is_file():
        _fail_field("inputs", f"{path} is not a file")
    try:
        with open(p, "rb") as f:
            head = f.read(2)
    except OSError as err:
        _fail_field("inputs", f"{path} cannot be read ({err.strerror})")
    if not head:
        _fail_field("inputs", f"{path} is empty")
    if path.lower().endswith(".gz") and head != b"\x1f\x8b":
        _fail_field("inputs", f"{path} is not gzip-compressed although its name ends in .gz")


def validate(cfg: DataPrepConfig) -> None:
    """Everything that can be checked before reading a document; raises DataPrepError."""
    if not cfg.inputs:
        _fail_field("inputs", "no input files; give them as inputs=[a.jsonl.gz,b.txt]")
    for path in cfg.inputs:
        _check_input(path)
    if not cfg.json_key:
        _fail_field("json_key", "must not be empty")
    if not cfg.output_prefix:
        _fail_field("output_prefix", "required: the output is <output_prefix>.bin + <output_prefix>.idx")
    prefix = cfg.output_prefix
    if prefix.endswith((".bin", ".idx")):
        _fail_field("output_prefix", f"give the prefix without .bin/.idx, e.g. {prefix[:-4]}")
    if prefix.endswith(os.sep) or Path(prefix).is_dir():
        _fail_field("output_prefix", f"{prefix} is a directory; give a prefix such as {prefix.rstrip(os.sep)}/name")
    if not cfg.overwrite:
        for suffix in (".idx", ".bin"):
            if os.path.exists(prefix + suffix):
                _fail_field("output_prefix", f"{prefix + suffix} already exists; pass overwrite=true to replace it")
    existing = next((d for d in Path(prefix).absolute().parents if d.exists()), None)
    if existing is not None and not existing.is_dir():
        _fail_field("output_prefix", f"{existing} is not a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        _fail_field("output_prefix", f"cannot write in {existing}")
    tok = cfg.tokenizer
    if tok.type not in ("byte", "huggingface"):
        _fail_field("tokenizer.type", f"'{tok.type}' is not one of byte, huggingface")
    if tok.type == "huggingface":
        if not tok.path:
            _fail_field("tokenizer.path", "type=huggingface needs path=<local tokenizer.json>")
        if not Path(tok.path).is_file():
            _fail_field("tokenizer.path", f"no tokenizer.json at {tok.path}")
    elif tok.path:
        _fail_field("tokenizer.path", f"is set ({tok.path}) but tokenizer.type=byte; add tokenizer.type=huggingface")
    if cfg.workers is not None and cfg.workers < 1:
        _fail_field("workers", f"must be >= 1 (or null for the number of CPUs), got {cfg.workers}")
    if cfg.batch_size < 1:
        _fail_field("batch_size", f"must be >= 1, got {cfg.batch_size}")


def _fail(message: str, code: int = 2) -> None:
    print(f"pma-data: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _load_tokenizer(cfg: TokenizerConfig):
    from pma_train.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(cfg)
    except ImportError as err:
        _fail(f"tokenizer.type: {err}")
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises plain Exception on a bad file
        message = str(err).replace("data.tokenizer.", "tokenizer.", 1)
        if not message.startswith("tokenizer."):
            message = f"tokenizer.path: cannot load {cfg.path}: {message}"
        _fail(message)


def run(cfg: DataPrepConfig) -> None:
    # "~" is left alone by the shell after "key=": expand it here.
    cfg.inputs = [os.path.expanduser(p) for p in cfg.inputs]
    cfg.output_prefix = cfg.output_prefix and os.path.expanduser(cfg.output_prefix)
    cfg.tokenizer.path = cfg.tokenizer.path and os.path.expanduser(cfg.tokenizer.path)
    try:
        validate(cfg)
    except DataPrepError as err:
        _fail(str(err))
    tokenizer = _load_tokenizer(cfg.tokenizer)
    workers = cfg.workers or default_workers()

    from pma_train.data.prepare import read_inputs, write_indexed_dataset

    try:
        summary = write_indexed_dataset(
            read_inputs(cfg.inputs, cfg.json_key), tokenizer, cfg.output_prefix, workers=workers,
            batch_documents=cfg.batch_size, progress=cfg.progress_bar and sys.stderr.isatty(),
            overwrite=cfg.overwrite)
    except FileExistsError as err:
        _fail(f"output_prefix: {err}; pass overwrite=true to replace it", code=1)
    except (ValueError, OSError) as err:  # InputError (file:line), out-of-range ids, no documents, I/O
        _fail(f"{err} (nothing written)", code=1)
    empty = f", {summary.empty:,} empty skipped" if summary.empty else ""
    use = f"data.paths=[{summary.prefix}]"
    if cfg.tokenizer.type == "huggingface":
        use += f" data.tokenizer.type=huggingface data.tokenizer.path={cfg.tokenizer.path}"
    print(f"pma-data: wrote {summary.prefix}.bin and {summary.prefix}.idx: {summary.documents:,} documents"
          f"{empty}, {summary.tokens:,} tokens ({summary.dtype}, EOD after each document) in "
          f"{summary.seconds:.1f} s ({summary.tokens / max(summary.seconds, 1e-9):,.0f} tokens/s, "
          f"{summary.workers} worker{'s' if summary.workers > 1 else ''}). Train on it with: pma-train {use}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="data")
def _run(node: DictConfig) -> None:
    run(to_config(DataPrepConfig, node))


def main() -> None:
    # megatron-core (for its dataset writer) notes at import that there is no CUDA / TE / Apex:
    # nothing to do with preparing data.
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    register_configs()
    _run()


if __name__ == "__main__":
    main()
