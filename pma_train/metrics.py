"""Metrics sinks: console (a progress bar or plain lines), a JSONL file (the source of truth), wandb."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pma_train.config import JobConfig


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
            self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
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
