"""The hooks through which the PMA features (pma_train/train/callbacks.py) join the training loop.

Each hook receives the Trainer (pma_train/train/trainer.py) and does nothing unless overridden; the
trainer calls every callback in the order `build_callbacks` gives them.
"""

from __future__ import annotations


class Callback:
    def on_resume(self, trainer, rewound: bool) -> None:
        """The job continues from trainer.state: once at start (rewound=False; also for a fresh run), and
        after a spike recovery put an earlier state back (rewound=True). Random draws inside are undone."""

    def before_step(self, trainer) -> None:
        """The next train step is about to run."""

    def after_step(self, trainer, result) -> bool:
        """A train step ran (trainer.state is past it). True: the step was undone (trainer.state is an
        earlier one); the loop logs, saves and evaluates nothing for it."""
        return False

    def log_metrics(self, trainer, steps: int) -> dict:
        """Figures for the train record that covers the last `steps` steps."""
        return {}

    def after_save(self, trainer, path) -> None:
        """The run's checkpoint of trainer.state.iteration was published at `path`."""

    def after_eval(self, trainer) -> dict:
        """The validation loss of trainer.state was computed; figures to log next to it."""
        return {}

    def on_train_end(self, trainer, summary: dict) -> None:
        """The loop ended (done or stopped on a signal); entries added to `summary` are returned by train()."""
