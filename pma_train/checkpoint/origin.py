"""Where a run started: the `checkpoint.init_from` it was initialised from, recorded in its checkpoints.

A restarted job resumes from its own checkpoints in checkpoint.dir, not from init_from again (as
Megatron-LM's --pretrained-checkpoint: own checkpoints win). The record tells such a restart from a
new run pointed at a directory that holds another run's checkpoints, where init_from would be
ignored without a word. Pure filesystem code: runs before megatron-core is imported.
"""

from __future__ import annotations

from pathlib import Path

from pma_train.checkpoint import layout, sidecar
from pma_train.checkpoint.layout import CheckpointError

# Key of TrainState.extra (saved in every checkpoint's side-car and carried across resumes).
INIT_FROM_KEY = "init_from"


def init_from_record(init_from: str | Path) -> str:
    """How a run records its init_from: the absolute path as given (a root, not its latest, which moves)."""
    return str(Path(init_from).resolve())


def recorded_init_from(ckpt_dir: Path) -> str | None:
    """The init_from a checkpoint's run started from; None for a run that did not (or predates the record)."""
    try:
        extra = sidecar.read_record(ckpt_dir, "extra") or {}
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{Path(ckpt_dir) / sidecar.FILE} is not valid JSON: {err}") from None
    return extra.get(INIT_FROM_KEY)


def check_restart_of_init_run(init_from: str, ckpt_root: str | Path) -> None:
    """Refuse init_from when checkpoint.dir holds checkpoints of a run that did not start from it."""
    own = layout.resolve_checkpoint(ckpt_root)
    recorded = recorded_init_from(own)
    if recorded == init_from_record(init_from):
        return
    started = f"started from {recorded}" if recorded else "did not start from checkpoint.init_from"
    raise CheckpointError(
        f"checkpoint.init_from: checkpoint.dir {ckpt_root} already holds checkpoints (latest {own.name}) of a run "
        f"that {started}; it would resume from them and ignore init_from={init_from}. Give a new checkpoint.dir "
        "to start from init_from, or drop checkpoint.init_from to resume that run")
