"""Stopping on a scheduler's signal: finish the step, save, exit with PREEMPTED_EXIT_CODE.

Slurm sends SIGTERM before a time limit or a preemption (and SIGKILL some seconds later: KillWait,
or torchrun's --shutdown-timeout); `#SBATCH --signal=USR1@300` asks for another signal earlier. The
handler only records the signal: the training loop reads the record once per step, all ranks agree
through the step's loss all-reduce (a signal may reach some ranks only, or at different steps), and
every rank stops after the same iteration. A signal that arrives again while the checkpoint is being
written is recorded too and does nothing else, so it cannot break the save. Processes forked while
the handler is installed (data loader workers, checkpoint writers) inherit it, so a signal sent to
the whole process group (Slurm signals every process of a job step) does not kill them either.
"""

from __future__ import annotations

import signal

# sysexits.h EX_TEMPFAIL ("temporary failure, try again"): stopped on a signal after saving; a
# rerun resumes. Distinct from pma-train's 1 (error), 2 (configuration) and 3 (locked).
PREEMPTED_EXIT_CODE = 75


class StopSignals:
    """Records the exit signals (names as in config.EXIT_SIGNALS) this process receives while
    installed; restore() puts the previous handlers back."""

    def __init__(self, names: list[str]):
        self.signals = [signal.Signals[name] for name in dict.fromkeys(names)]
        self.received: list[str] = []
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        # Nothing else here: the handler runs between two bytecodes of whatever the main thread does.
        self.received.append(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def first(self) -> str | None:
        return self.received[0] if self.received else None
