"""`pma_train.json`: where a run stood at a checkpoint (TrainState) and what its features recorded
there (optimizer layout, tracked-merge window, origin), next to the checkpoint's DCP files.

Rank 0 writes it once per checkpoint, inside the temporary directory before the publish
(checkpoint/state.py); a merge copies its newest input's as it is (merge/engine.py). It is read by
merge selection, by the checks a job runs before megatron-core is imported, and by load: so this
module is JSON and paths only, and imports nothing of ours. A Megatron-LM checkpoint has none.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILE = "pma_train.json"
# TrainState's counters, non-negative ints in every sidecar pma-train writes (layout.check_json_sidecars).
COUNTERS = ("iteration", "consumed_samples", "consumed_tokens")


@dataclass
class TrainState:
    """Where a run stands; recorded in every checkpoint (merges select checkpoints by tokens)."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def write(ckpt_dir: str | Path, state: TrainState, records: dict[str, Any] | None = None) -> None:
    """The sidecar of `ckpt_dir`: the state's fields, then each feature's record under its key."""
    (Path(ckpt_dir) / FILE).write_text(json.dumps({**asdict(state), **(records or {})}, indent=2, default=str))


def read(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The whole sidecar; None where the checkpoint has none. Raises ValueError if it is not JSON."""
    path = Path(ckpt_dir) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_record(ckpt_dir: str | Path, key: str) -> Any:
    """One feature's record (e.g. "extra", optimizer_format.SIDECAR_KEY); None where absent."""
    return (read(ckpt_dir) or {}).get(key)


def read_train_state(ckpt_dir: str | Path) -> TrainState | None:
    """The TrainState pma-train recorded; None where the checkpoint has no sidecar."""
    data = read(ckpt_dir)
    if data is None:
        return None
    return TrainState(**{k: data[k] for k in COUNTERS}, extra=dict(data.get("extra", {})))


def read_progress(ckpt_dir: str | Path) -> tuple[int, int] | None:
    """(iteration, consumed tokens), all a merge's selection needs; None where there is no sidecar."""
    data = read(ckpt_dir)
    return None if data is None else (int(data["iteration"]), int(data["consumed_tokens"]))


def bad_counters(data: dict[str, Any]) -> list[str]:
    """The counters a (parsed) sidecar lacks or holds as something other than a count."""
    return [name for name in COUNTERS if not isinstance(data.get(name), int) or data[name] < 0]
