"""Cost of the untrusted-checkpoint check (pma_train/checkpoint/untrusted.py) on given checkpoints.

    python benchmarks/untrusted_check.py <iter_* dir> [...]

Per checkpoint: its size and stored entries; torch's plain `pickle.load` of `.metadata`; the restricted
read of `.metadata`; the check of every other pickle (each entry's torch.save header, common state,
RNG state); and, for scale, reading every byte of the checkpoint (what any load does at least).
Medians of --rounds rounds (files in the page cache after the first).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time
from pathlib import Path

from pma_train.checkpoint import untrusted


def _timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        untrusted._vetted.clear()  # measure the check, not the once-per-process cache
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _read_all(ckpt: Path) -> None:
    for path in ckpt.iterdir():
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.read(64 * 2**20):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| checkpoint | MiB | entries | pickle.load .metadata ms | restricted .metadata ms | "
          "check of all pickles ms | ms / entry | read every byte ms |")
    print("|---|---|---|---|---|---|---|---|")
    for ckpt in args.checkpoints:
        metadata = untrusted.read_metadata(ckpt)
        entries = len(metadata.storage_data)
        size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file()) / 2**20

        def plain():
            with open(ckpt / ".metadata", "rb") as f:
                pickle.load(f)  # the files are our own here: this is the baseline being replaced

        t_plain = _timed(plain, args.rounds)
        t_meta = _timed(lambda: untrusted.read_metadata(ckpt), args.rounds)
        t_vet = _timed(lambda: untrusted.vet_pickles(ckpt, metadata), args.rounds)
        t_read = _timed(lambda: _read_all(ckpt), args.rounds)
        print(f"| {ckpt} | {size:.1f} | {entries} | {t_plain:.1f} | {t_meta:.1f} | {t_vet:.1f} | "
              f"{t_vet / entries:.2f} | {t_read:.1f} |")
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
