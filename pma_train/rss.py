"""Peak resident memory of this process during a block of work (sampled in a thread)."""

from __future__ import annotations

import threading

import psutil


class PeakRss:
    """`with PeakRss() as rss: ...` then rss.peak, and rss.peak - rss.start: growth during the block."""

    def __init__(self, interval: float = 0.005):
        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
