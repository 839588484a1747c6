"""The training loop: step / log / save / evaluate until done, over the components `build(cfg)` made,
with the PMA features joining in through callbacks (pma_train/train/callbacks.py)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from pma_train.checkpoint import async_save, rng
from pma_train.checkpoint.sidecar import TrainState
from pma_train.config import JobConfig
from pma_train.config.perf import summary as perf_summary
from pma_train.model.flops import model_flops_per_token
from pma_train.train.callbacks import build_callbacks
from pma_train.train.components import build
from pma_train.train.flops import peak_flops_per_gpu
from pma_train.train.optim import parameters_in_sync
from pma_train.train.preemption import PREEMPTED_EXIT_CODE, StopSignals
from pma_train.train.step import DataTimer, PhaseTimer, make_forward_step, reduce_lm_loss, validation_loss

# Train-record keys shown on the terminal (every key goes to metrics.jsonl).
CONSOLE = ("loss", "lr", "grad_norm", "tokens_per_s", "step_s", "mfu", "moe_load_balancing_loss", "moe_z_loss",
           "moe_load_imbalance")


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    seconds: dict[str, float]
    stop: bool = False  # some rank received an exit signal: every rank stops after this step


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.parts = parts = build(cfg)
        self.cfg, self.platform, self.model, self.log = parts.cfg, parts.platform, parts.model, parts.log
        self.optimizer, self.scheduler, self.checkpointer = parts.optimizer, parts.scheduler, parts.checkpointer
        self.state, self.train_iters = parts.state, parts.train_iters
        self.rank0 = dist.get_rank() == 0
        self.run_dir = Path(self.cfg.run.dir)
        t = self.cfg.train
        self.num_microbatches = parts.num_microbatches
        self.tokens_per_iter = t.global_batch_size * t.seq_length
        self.data_timer = DataTimer()
        self.timer = PhaseTimer(self.platform.is_cuda)
        self.forward_step = make_forward_step(self.platform.device, self.data_timer)
        self.forward_backward = get_forward_backward_func()
        self.flops_per_token = model_flops_per_token(self.model, self.cfg)
        config = parts.model_config
        self.peak_flops = peak_flops_per_gpu(self.platform.device, config.bf16 or config.fp16)
        self.train_seconds = 0.0
        self.stop_signals = StopSignals([])  # installed while train() runs
        self._in_sync = False  # inside _parameters_gathered()
        self.callbacks = build_callbacks(self.cfg, self.model)
        with rng.preserved():  # e.g. the tracker reloading grid checkpoints restores their RNG states
            self._call("on_resume", rewound=False)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        self.stop_signals = StopSignals(self.cfg.train.exit_signals).install()
        try:
            return self._train()
        finally:
            self.stop_signals.restore()

    def _train(self) -> dict:
        t = self.cfg.train
        self._announce()
        start_iter, start_time = self.state.iteration, time.perf_counter()
        window, last_eval, preempted = _Window(), None, None
        evaluating = t.eval_iters > 0  # 0 turns evaluation off, as in Megatron-LM: no validation loss is logged
        if t.eval_at_start and evaluating:
            last_eval = self.evaluate()
            self.log.log(start_iter, {"loss": last_eval, "consumed_tokens": self.state.consumed_tokens}, kind="val")
        stop_at = t.iters if t.exit_after_iters is None else min(t.iters, start_iter + t.exit_after_iters)
        while self.state.iteration < stop_at:
            step_start = time.perf_counter()
            self._call("before_step")
            result = self.train_step()
            async_save.maybe_finalize()  # publishes a checkpoint written behind training, once all ranks wrote it
            window.add(result, time.perf_counter() - step_start)
            self.train_seconds += time.perf_counter() - step_start
            if any(self._call("after_step", result)):  # a spike recovery undid it
                window, _ = _Window(), self.timer.pop()
                continue
            it = self.state.iteration
            self.log.advance(1, loss=result.loss, lr=result.lr)
            if it % t.log_interval == 0 or it == t.iters:
                self._log_window(it, window, result)
                window = _Window()
            if it % self.cfg.checkpoint.interval == 0 or (it == t.iters and self.cfg.checkpoint.save_at_end):
                self.save()
            if result.stop and it < t.iters:  # the last iteration finishes as usual
                preempted = self._stop_on_signal()
                break
            if evaluating and (it % t.eval_interval == 0 or it == t.iters):
                last_eval = self.evaluate()
                extra = {k: v for figures in self._call("after_eval") for k, v in figures.items()}
                self.log.log(it, {"loss": last_eval, "consumed_tokens": self.state.consumed_tokens, **extra},
                             kind="val")
        async_save.wait()  # the last checkpoint is published before the job ends (preempted or not)
        elapsed = time.perf_counter() - start_time
        summary = {"iterations": self.state.iteration - start_iter, "final_iteration": self.state.iteration,
                   "val_loss": last_eval, "seconds": elapsed, "run_dir": str(self.run_dir),
                   "train_step_seconds": self.train_seconds, "preempted": preempted}
        self._call("on_train_end", summary)
        self.log.print(f"done: {summary['iterations']} iterations in {elapsed:.1f} s, "
                       f"val loss {last_eval if last_eval is None else round(last_eval, 4)}, run dir {self.run_dir}")
        self.log.close()
        return summary

    def train_step(self) -> StepResult:
        t = self.cfg.train
        self.timer.start()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=self.train_iters, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=False)
        self.timer.mark("fwd_bwd")
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)  # the scheduler counts iterations (pma_train/schedule.py)
        self.timer.mark("optimizer")
        loss, _, stop = reduce_lm_loss(losses, self.platform.device, self.stop_signals.requested)
        self.timer.mark("loss_reduce")
        self.state.iteration += 1
        self.state.consumed_samples += t.global_batch_size
        self.state.consumed_tokens += self.tokens_per_iter
        lr = self.optimizer.param_groups[0]["lr"]
        return StepResult(loss, float(grad_norm or 0.0), lr, not updated, {"data": self.data_timer.pop()}, stop)

    def evaluate(self) -> float:
        with self._parameters_gathered():
            loss = validation_loss(self.parts, self.forward_step)
        self.data_timer.pop()  # the eval batches' wait is not training's
        return loss

    def save(self) -> Path:
        with self._parameters_gathered():  # the checkpoint and the callbacks' snapshots see whole parameters
            path = self.checkpointer.save(self.model, self.optimizer, self.scheduler, self.state)
            self._call("after_save", path)
        return path

    @contextlib.contextmanager
    def _parameters_gathered(self):
        """Whole parameters in the model (perf.overlap_param_gather defers their gather to the next
        forward); once, however deep the calls nest (a tracked merge evaluates inside after_eval)."""
        if self._in_sync:
            yield
            return
        self._in_sync = True
        try:
            with parameters_in_sync(self.model):
                yield
        finally:
            self._in_sync = False

    def rewind(self, state: TrainState) -> None:
        """Go on from an earlier state (a spike recovery loaded it into the model): the data from its
        position, the iterations ahead trained (and saved) again."""
        self.state = state
        self.checkpointer.last_saved_iteration = None
        for batches in self.train_iters if isinstance(self.train_iters, list) else [self.train_iters]:
            getattr(batches, "close", lambda: None)()  # a read-ahead thread holds batches of the old position
        self.train_iters = self.parts.train_iterators(state.consumed_samples)
        self._call("on_resume", rewound=True)

    # ------------------------------------------------------------------ small things

    def _call(self, hook: str, *args, **kwargs) -> list:
        return [getattr(callback, hook)(self, *args, **kwargs) for callback in self.callbacks]

    def _log_window(self, it: int, window: "_Window", result: StepResult) -> None:
        figures = {"loss": window.mean_loss(), "lr": result.lr, "grad_norm": result.grad_norm,
                   "tokens_per_s": self.tokens_per_iter * window.steps / window.seconds,
                   "step_s": window.seconds / window.steps, "consumed_tokens": self.state.consumed_tokens,
                   "skipped_steps": window.skipped, **self._flops(window), **window.breakdown(self.timer.pop())}
        for extra in self._call("log_metrics", window.steps):
            figures.update(extra)
        self.log.log(it, figures, console=CONSOLE)

    def _stop_on_signal(self) -> str:
        """Every rank agreed to stop after this step: save (unless just saved), record it."""
        it = self.state.iteration
        path = None
        if self.cfg.checkpoint.save_on_signal:
            path = self.save() if self.checkpointer.last_saved_iteration != it else self.checkpointer.path(it)
        # A rank the signal did not reach stops too; it knows only that another rank got one.
        name = self.stop_signals.first() or "signal on another rank"
        self.log.log(it, {"signal": name, "checkpoint": None if path is None else str(path),
                          "exit_code": PREEMPTED_EXIT_CODE}, kind="preempted")
        return name

    def _flops(self, window: "_Window") -> dict[str, float]:
        """Model TFLOP/s per rank, and MFU where the GPU's peak is known."""
        per_rank = self.flops_per_token * self.tokens_per_iter * window.steps / window.seconds / dist.get_world_size()
        out = {"tflops_per_rank": per_rank / 1e12}
        if self.peak_flops:
            out["mfu"] = per_rank / self.peak_flops
        return out

    def _announce(self) -> None:
        p = self.cfg.parallel
        params = sum(p_.numel() for chunk in self.model for p_ in chunk.parameters())
        self.log.print(f"pma-train: model {self.cfg.model.name} ({params / 1e6:.2f}M params on rank 0) | world "
                       f"{dist.get_world_size()} = tp {p.tp} x pp {p.pp}{f' (vpp {p.vpp})' if p.vpp else ''} x dp "
                       f"{parallel_state.get_data_parallel_world_size()} (ep {p.ep}) | {self.platform.device.type}/{self.platform.backend} | "
                       f"start iteration {self.state.iteration} | run dir {self.run_dir}")
        self.log.print(perf_summary(self.cfg))
        for line in self.parts.notes:
            self.log.print(line)


class _Window:
    """Accumulates the steps between two log lines: every logged figure is a mean over them."""

    def __init__(self):
        self.steps, self.seconds, self.loss, self.skipped = 0, 0.0, 0.0, 0
        self.parts: dict[str, float] = {}

    def add(self, result: StepResult, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.loss += result.loss
        self.skipped += int(result.skipped)
        for key, value in result.seconds.items():
            self.parts[key] = self.parts.get(key, 0.0) + value

    def mean_loss(self) -> float:
        return self.loss / self.steps

    def breakdown(self, phases: dict[str, float]) -> dict[str, float]:
        """Mean seconds per step of each phase; `phases` (from the PhaseTimer) include the data wait."""
        phases = {**self.parts, **phases}
        if "fwd_bwd" in phases:
            phases["fwd_bwd"] = max(0.0, phases["fwd_bwd"] - phases.get("data", 0.0))
        parts = {f"time_{k}_s": v / self.steps for k, v in phases.items()}
        # What the loop itself costs besides the step: logging, progress bar, bookkeeping.
        parts["time_other_s"] = max(0.0, self.seconds / self.steps - sum(parts.values()))
        return parts
