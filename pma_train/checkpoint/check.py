"""`pma-check`: verify whole checkpoints (complete, and every recorded checksum) of one directory or a tree.

A target is a torch_dist checkpoint (`.metadata`: iter_* dirs of a training run, pma-merge outputs) or
any directory with a `checksums.json` (pma-export outputs). Files are verified by a pool of worker
threads (hashing and reading release the GIL), largest first. Imports torch's DCP metadata reader and
pma_train.checkpoint only: no megatron-core.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed.checkpoint  # noqa: F401  (imported up front: not timed as verification)

from pma_train.checkpoint import integrity, layout
from pma_train.checkpoint.layout import CheckpointError


@dataclass
class CheckConfig:
    """pma-check's options (conf/check.yaml)."""

    path: str | None = None  # a checkpoint (iter_* dir, merge or export output) or a root / tree holding them
    workers: int = 4  # threads verifying files in parallel
    progress_bar: bool = True
    require_checksums: bool = False  # a checkpoint without checksums.json counts as bad, not just unverified


@dataclass
class Report:
    path: Path
    nbytes: int = 0
    items: int = 0
    checksums: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.problems:
            return "BAD"
        return "ok" if self.checksums else "unverified"


@dataclass
class _Task:
    report: Report
    algorithm: str
    entries: list[integrity.Entry]

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.entries)


def is_target(path: Path) -> bool:
    return layout.is_checkpoint_dir(path) or (path / integrity.SIDECAR).is_file()


def find_targets(path: str | Path) -> tuple[list[Path], list[Report]]:
    """Checkpoints at or under path (hidden temporaries skipped), and problems of the roots' trackers."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"path: {path} does not exist")
    if is_target(path):
        return [path], []
    dirs = [path] + sorted(p for p in path.rglob("*") if p.is_dir()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
    targets = [d for d in dirs if is_target(d)]
    trackers = [_tracker_report(d) for d in dirs if (d / layout.TRACKER_FILE).is_file()]
    if not targets:
        raise CheckpointError(f"path: {path} holds no checkpoint (no .metadata or {integrity.SIDECAR} under it)")
    return targets, [r for r in trackers if r.problems]


def _tracker_report(root: Path) -> Report:
    report = Report(root / layout.TRACKER_FILE, checksums=True)
    try:
        latest = layout.read_tracker(root)
    except (CheckpointError, UnicodeDecodeError) as err:
        report.problems.append(f"{root / layout.TRACKER_FILE}: {err}")
        return report
    if latest is not None and not (root / layout.iter_dir_name(latest)).is_dir():
        report.problems.append(f"{root / layout.TRACKER_FILE} names iteration {latest}, "
                               f"but {root / layout.iter_dir_name(latest)} does not exist")
    return report


def plan_target(target: Path, require_checksums: bool) -> tuple[Report, list[_Task]]:
    """Completeness checks, and one verification task per file of the target."""
    report = Report(target)
    try:
        items = None
        if layout.is_checkpoint_dir(target):
            layout.verify_complete(target)
            items = integrity.storage_items(target) if (target / ".metadata").is_file() else None
        checksums = integrity.read_checksums(target)
    except CheckpointError as err:
        report.problems.append(str(err))
        return report, []
    if checksums is None:
        report.nbytes = sum(length for _, _, length, _ in items or [])
        report.items = len(items or [])
        if require_checksums:
            report.problems.append(f"{target} carries no checksums ({integrity.SIDECAR})")
        return report, []
    report.checksums, report.nbytes = True, checksums.nbytes
    report.items = len(checksums.chunks) + len(checksums.files)
    if items is not None:
        report.problems.extend(integrity.uncovered(target, checksums, items))
    tasks = [_Task(report, checksums.algorithm, group) for group in integrity.work_units(checksums)]
    return report, tasks


def run_check(cfg: CheckConfig) -> list[Report]:
    """Reports of every target under cfg.path (the trackers' problems included), targets in path order."""
    if cfg.workers < 1:
        raise CheckpointError(f"workers: must be at least 1, got {cfg.workers}")
    targets, trackers = find_targets(cfg.path)
    with ThreadPoolExecutor(cfg.workers) as pool:
        planned = list(pool.map(lambda t: plan_target(t, cfg.require_checksums), targets))
        tasks = sorted((t for _, ts in planned for t in ts), key=lambda t: -t.nbytes)
        progress = _Progress(sum(t.nbytes for t in tasks), cfg.progress_bar)
        try:
            found = list(pool.map(lambda t: integrity.verify_file_entries(
                t.report.path, t.algorithm, t.entries, progress.update), tasks))
        finally:
            progress.close()
    for task, problems in zip(tasks, found):
        task.report.problems.extend(problems)
    return [r for r, _ in planned] + trackers


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar, self.lock = None, threading.Lock()
        if enabled and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="pma-check",
                            dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_table(reports: list[Report], seconds: float) -> str:
    lines = [f"{'status':<10}  {'size':>10}  {'items':>7}  checkpoint"]
    for r in reports:
        lines.append(f"{r.status:<10}  {_size(r.nbytes):>10}  {r.items:>7}  {r.path}")
        lines.extend(f"    - {p}" for p in r.problems)
    bad = sum(1 for r in reports if r.problems)
    unverified = sum(1 for r in reports if r.status == "unverified")
    total = sum(r.nbytes for r in reports if r.checksums)
    lines.append(f"{len(reports)} checked: {len(reports) - bad - unverified} ok, {bad} bad, {unverified} without "
                 f"checksums (complete, data unverified); {_size(total)} verified in {seconds:.1f} s "
                 f"({total / max(seconds, 1e-9) / 1e9:.2f} GB/s)")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def timed_check(cfg: CheckConfig) -> tuple[list[Report], float]:
    start = time.perf_counter()
    reports = run_check(cfg)
    return reports, time.perf_counter() - start
