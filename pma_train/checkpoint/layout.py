"""Megatron-LM's checkpoint directory layout, atomic publishing, and completeness checks.

`<root>/iter_0000100/` holds one torch_dist checkpoint; `<root>/latest_checkpointed_iteration.txt`
names the newest complete one. A checkpoint is written under a hidden temporary name and renamed
into place only when every rank has finished, so a crash never leaves a checkpoint-looking
directory behind. Pure filesystem code: the merge engine uses it too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from pma_train.checkpoint import sidecar

TRACKER_FILE = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
TMP_PREFIX = ".tmp-"


# DCP keys of megatron-core's optimizer state: "optimizer." or, for a chained optimizer (dense and
# expert parameters apart) saved dp_reshardable, "chained_<i>.optimizer.".
_OPTIMIZER_KEY = re.compile(r"(chained_\d+\.)?optimizer\.")


def is_optimizer_key(key: str) -> bool:
    return _OPTIMIZER_KEY.match(key) is not None

class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or of an unexpected kind; the message names it."""


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(ckpt_dir: Path) -> int | None:
    match = _ITER_DIR.match(Path(ckpt_dir).name)
    return int(match.group(1)) if match else None


def read_tracker(root: Path) -> int | None:
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{tracker} is not a text file (byte {err.start} is 0x{err.object[err.start]:02x}): "
                              "it should hold an iteration number") from None
    except OSError as err:
        raise CheckpointError(f"{tracker} cannot be read: {err.strerror}") from None
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError as err:
        raise CheckpointError(f"{tracker} holds '{text}', not an iteration number") from err


def write_tracker(root: Path, iteration: int) -> None:
    tmp = Path(root) / f"{TMP_PREFIX}{TRACKER_FILE}.{uuid.uuid4().hex}"
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, Path(root) / TRACKER_FILE)


def list_iterations(root: Path) -> list[int]:
    """Iterations of the published checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (iteration_of(p) for p in root.iterdir() if p.is_dir())
    return sorted(i for i in found if i is not None)


def set_aside(root: Path, after: int, into: str) -> list[int]:
    """Move the checkpoints newer than `after` to a new folder root/into[-k]/ (kept, but out of
    resume's way) and point the tracker at `after`; returns the iterations moved."""
    moved = [i for i in list_iterations(root) if i > after]
    if moved:
        target, k = Path(root) / into, 1
        while target.exists():
            k += 1
            target = Path(root) / f"{into}-{k}"
        target.mkdir()
        for i in moved:
            os.replace(Path(root) / iter_dir_name(i), target / iter_dir_name(i))
        write_tracker(root, after)
    return moved


def is_checkpoint_dir(path: Path) -> bool:
    path = Path(path)
    return (path / ".metadata").is_file() or (path / "metadata.json").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """An iter_* directory from either itself or a checkpoint root (its latest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_checkpoint_dir(path):
        return path
    latest = read_tracker(path)
    if latest is None:
        iterations = list_iterations(path)
        if not iterations:
            raise CheckpointError(f"{path} is neither a checkpoint directory nor a root holding one")
        latest = iterations[-1]
    ckpt = path / iter_dir_name(latest)
    if not ckpt.is_dir():
        raise CheckpointError(f"{path / TRACKER_FILE} names iteration {latest}, but {ckpt} does not exist")
    return ckpt


def read_metadata(ckpt_dir: str | Path):
    """A checkpoint's DCP Metadata, unpickled with only the classes it is made of (never plain pickle)."""
    from pma_train.checkpoint.untrusted import UnsafeCheckpointError, read_metadata

    try:
        return read_metadata(ckpt_dir)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None


def verify_complete(ckpt_dir: str | Path) -> None:
    """Raise CheckpointError unless every data file the DCP metadata references is present and whole,
    and every pickle in the checkpoint holds only what checkpoints are made of (safe to load: see
    checkpoint/untrusted.py). Every path that loads a checkpoint calls this first."""
    from pma_train.checkpoint.untrusted import UnsafeCheckpointError, vet_pickles

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir} has no .metadata: not a torch_dist checkpoint, or truncated")
    metadata = read_metadata(ckpt_dir)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = ckpt_dir / name
        if not file.is_file():
            raise CheckpointError(f"{ckpt_dir}: data file {name} is missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{ckpt_dir}: data file {name} is truncated "
                                  f"({file.stat().st_size} of {size} bytes)")
    check_json_sidecars(ckpt_dir)
    try:
        vet_pickles(ckpt_dir, metadata)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None


# The JSON files next to the DCP data: megatron's, the train state (checkpoint/sidecar.py), a merge's
# provenance (merge/engine.py), the checksums (checkpoint/integrity.py).
TRAIN_STATE_SIDECAR = sidecar.FILE
MERGE_PROVENANCE = "pma_merge.json"
JSON_SIDECARS = ("metadata.json", TRAIN_STATE_SIDECAR, MERGE_PROVENANCE, "checksums.json")


def check_json_sidecars(ckpt_dir: Path) -> None:
    """Each JSON sidecar present parses to an object, and the train state has its counters: a torn or
    corrupted one is named here rather than failing as a decoding error midway through a load."""
    for name in JSON_SIDECARS:
        path = Path(ckpt_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is corrupted: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is corrupted: a JSON {type(data).__name__}, not an object")
        if name == TRAIN_STATE_SIDECAR:
            bad = sidecar.bad_counters(data)
            if bad:
                raise CheckpointError(f"{path} is corrupted: {', '.join(bad)} missing or not a count")


def check_loadable(path: str | Path) -> Path:
    """The iter_* directory a load of `path` would read, verified complete."""
    ckpt = resolve_checkpoint(path)
    verify_complete(ckpt)
    return ckpt


def is_gpt_checkpoint(ckpt_dir: Path) -> bool:
    """Megatron-LM GPTModel checkpoints stack layers under one key: decoder.layers.<name> (no index)."""
    keys = read_metadata(ckpt_dir).state_dict_metadata.keys()
    return any(k.startswith("decoder.layers.") and not k.split(".")[2].isdigit() for k in keys)


def temporary_dir(root: Path, iteration: int, token: str) -> Path:
    return Path(root) / f"{TMP_PREFIX}{iter_dir_name(iteration)}.{token}"


def publish(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished checkpoint into place; an older one of the same name is replaced, not lost first."""
    final_dir = Path(final_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f"{TMP_PREFIX}replaced-{final_dir.name}.{uuid.uuid4().hex}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> None:
    """Drop leftovers of checkpoints that were being written when a job died."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
