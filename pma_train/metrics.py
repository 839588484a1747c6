"""Metrics sinks: console (a progress bar or plain lines), a JSONL file (the source of truth), wandb;
and `read_metrics`, the one reader of that file.

A resumed job appends to the same metrics.jsonl: it first writes a record of kind "resume" (the
iteration it continues from and the checkpoint), then logs steps after it again. Steps logged
after that iteration before the resume belong to a trajectory the job abandoned when it died.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pma_train.config import JobConfig

METRICS_FILE = "metrics.jsonl"
# Records of events, not of measurements at a step: every one is kept.
EVENT_KINDS = frozenset({"resume", "recovery", "retention", "preempted"})


def _format(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.3e}"
        if key.endswith("tokens_per_s"):
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4f}" if math.isfinite(value) else f"{key} {value}"
    return f"{key} {value}"


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no rank checks."""

    def __init__(self, cfg: JobConfig, run_dir: Path, total_iters: int, start_iter: int, enabled: bool):
        self.enabled = enabled
        self._jsonl = None
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        if cfg.logging.jsonl:
            self._jsonl = _open_for_append(Path(run_dir) / METRICS_FILE)
        if cfg.logging.wandb.mode != "disabled":
            import wandb

            w = cfg.logging.wandb
            self._wandb = wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.run.name,
                                     mode=w.mode, dir=str(run_dir), config=asdict(cfg), resume="allow")
        if cfg.logging.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train",
            console: tuple[str, ...] | None = None) -> None:
        """Everything to JSONL and wandb; `console` picks the keys shown on the terminal."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **metrics}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        shown = metrics if console is None else {k: metrics[k] for k in console if k in metrics}
        self.print(f"[{kind}] step {step} | " + " | ".join(_format(k, v) for k, v in shown.items()))

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in postfix.items()})

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _ends_torn(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _open_for_append(path: Path):
    # A job killed mid-write leaves a torn last line: end it, so the next record stays whole.
    torn = _ends_torn(path)
    f = open(path, "a", buffering=1)
    if torn:
        f.write("\n")
    return f


def _parsed_lines(path: Path):
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:  # a line torn by a killed job: the rest of the file is still good
            warnings.warn(f"{path}:{number}: not a JSON record (torn by a killed job?), skipped", stacklevel=3)


def read_metrics(path: str | Path, kind: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (of one kind, if given) as the run's history: in step order,
    the newest record per (kind, step); a resume drops the measurements logged beyond its iteration
    before it. Events (EVENT_KINDS) are all kept. A missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], tuple[int, dict]] = {}
    events: list[tuple[int, dict]] = []
    for seq, record in enumerate(_parsed_lines(path)):
        key = (record.get("kind"), record.get("step"))
        if key[0] == "resume":
            latest = {k: v for k, v in latest.items() if k[1] is None or k[1] <= key[1]}
        if key[0] in EVENT_KINDS:
            events.append((seq, record))
        else:
            latest[key] = (seq, record)
    rows = sorted([*latest.values(), *events], key=lambda item: (item[1].get("step") or 0, item[0]))
    return [r for _, r in rows if kind is None or r.get("kind") == kind]
