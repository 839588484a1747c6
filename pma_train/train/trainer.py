"""The training loop: build everything, then step / log / evaluate / checkpoint until done."""

from __future__ import annotations

import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from pma_train import platform as platform_mod
from pma_train.checkpoint import async_save, layout, rng
from pma_train.checkpoint.lock import acquire_on_rank0
from pma_train.checkpoint.origin import INIT_FROM_KEY, init_from_record
from pma_train.checkpoint.retention import prune
from pma_train.checkpoint.state import TrainState, load_checkpoint, save_checkpoint
from pma_train.config import ConfigError, JobConfig, track_spacing_iters, validate
from pma_train.data import EvalIterator, MicroBatchIterator, build_datasets, build_tokenizer
from pma_train.metrics import MetricsLogger
from pma_train.model import build_model
from pma_train.parallel import init_distributed
from pma_train.schedule import build_annealing_scheduler, build_scheduler, scheduler_increment
from pma_train.train.flops import flops_per_token, peak_flops_per_gpu
from pma_train.train.moe_metrics import MoEMetrics
from pma_train.train.optim import build_optimizer, wrap_ddp
from pma_train.train.preemption import PREEMPTED_EXIT_CODE, StopSignals
from pma_train.train.spike import RecoveryBudget, SpikeDetector
from pma_train.train.step import DataTimer, PhaseTimer, make_forward_step, reduce_lm_loss


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
        validate(cfg)  # before any process group: bad input fails fast and touches nothing
        self.platform = platform_mod.detect(cfg.parallel.backend)
        init_distributed(cfg.parallel, self.platform, cfg.seed)
        self.cfg = cfg = _same_config_on_all_ranks(cfg)
        self.rank0 = dist.get_rank() == 0
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = Path(cfg.checkpoint.dir)
        # Before anything touches the root (a second job would delete this one's in-flight save).
        self.ckpt_lock = acquire_on_rank0(self.ckpt_root, cfg.checkpoint.force_unlock, "checkpoint.force_unlock=true",
                                          "pma-train")
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            layout.remove_stale_temporaries(self.ckpt_root)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        chunks = build_model(cfg, self.platform, self.tokenizer.vocab_size)
        self.model_config = chunks[0].config
        self.model = wrap_ddp(chunks, self.model_config, cfg)
        self.optimizer = build_optimizer(self.model, cfg, self.model_config)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * self.dp_size)
        self.tokens_per_iter = cfg.train.global_batch_size * cfg.train.seq_length
        self.scheduler = None if cfg.schedule.name == "anneal" else build_scheduler(
            self.optimizer, cfg.schedule, cfg.train, self.tokens_per_iter)
        self.log_lines: list[str] = []
        self.resumed_from: Path | None = None  # the checkpoint this process continues from, if any
        self.state = self._load_initial_state()
        # What is built from here on draws random numbers (data loader seeds) that an uninterrupted
        # run drew before its checkpoint: undone at the end, so a resumed run steps on exactly.
        loaded_rng = rng.capture()

        t = cfg.train
        self.train_ds, self.valid_ds = build_datasets(
            cfg.data, self.tokenizer, t.seq_length, cfg.seed,
            (t.iters * t.global_batch_size, t.eval_iters * t.global_batch_size))
        self.data_timer = DataTimer()
        self.timer = PhaseTimer(self.platform.is_cuda)
        self.forward_step = make_forward_step(self.platform.device, self.data_timer)
        self.forward_backward = get_forward_backward_func()
        self.train_iters = self._data_iterators(self.state.consumed_samples)
        self.log = MetricsLogger(cfg, self.run_dir, t.iters, self.state.iteration, enabled=self.rank0)
        if self.resumed_from is not None:
            # Readers let the records that follow replace those of the same steps (pma_train/metrics.py).
            self.log.log(self.state.iteration, {"iteration": self.state.iteration,
                                                "checkpoint": str(self.resumed_from)}, kind="resume")
        self.tracker, self.track_spacing = self._build_tracker()
        self.track_seconds = 0.0  # time the tracker costs the training loop (snapshots)
        self.train_seconds = 0.0
        self.detector = SpikeDetector(cfg.spike) if cfg.spike.enabled else None
        self.recovery_budget = RecoveryBudget(cfg.spike)
        self.flops_per_token = flops_per_token(self.model, cfg)
        self.peak_flops = peak_flops_per_gpu(self.platform.device, self.model_config.bf16 or self.model_config.fp16)
        self.moe_metrics = MoEMetrics(self.model, self.model_config, cfg.model.pattern(),
                                      cfg.parallel.sequence_parallel) if cfg.model.num_experts else None
        self._spike_steps_left: int | None = None
        self.stop_signals = StopSignals([])  # installed while train() runs
        self.last_saved_iteration: int | None = None
        a = cfg.checkpoint.async_save
        self.async_save = self.platform.is_cuda if a is None else a
        rng.restore(loaded_rng)

    # ------------------------------------------------------------------ setup helpers

    def _load_initial_state(self) -> TrainState:
        c = self.cfg.checkpoint
        own = self.ckpt_root if layout.list_iterations(self.ckpt_root) else None
        if self.cfg.schedule.name == "anneal":
            return self._start_annealing_branch(own)
        resume_from = own if c.load is None else c.load
        if resume_from is not None:
            optimizer = None if c.no_load_optim else self.optimizer
            state = load_checkpoint(resume_from, self.model, optimizer, self.scheduler)
            if optimizer is None:
                self.optimizer.reload_model_params()
            self.resumed_from = layout.resolve_checkpoint(resume_from)
            if c.init_from is not None:  # pma-train's CLI checked these checkpoints started from it
                self.log_lines.append(f"checkpoint.init_from: this run started from {c.init_from}; a restart "
                                      f"resumes from its own checkpoint {self.resumed_from}")
            return state
        state = TrainState()
        if c.init_from is not None:
            load_checkpoint(c.init_from, self.model)
            # Recorded in every checkpoint, so a restart knows its own checkpoints (pma_train/checkpoint/origin.py).
            state.extra[INIT_FROM_KEY] = init_from_record(c.init_from)
        elif c.init_merge.root is not None:
            self._init_from_merge()
        # Mixed precision keeps fp32 main weights in the optimizer: refresh them from the model.
        self.optimizer.reload_model_params()
        return state

    def _init_from_merge(self) -> None:
        """PMA-init: the average of a run's last n checkpoints, loaded shard by shard into this model."""
        from pma_train.merge import merge_weights, select_spaced
        from pma_train.merge.live import average_into_model

        m = self.cfg.checkpoint.init_merge
        chosen = select_spaced(m.root, m.n, m.v_tokens, m.v_iterations, m.end_iteration)
        weights = merge_weights(m.method, len(chosen), m.alpha, decay_shape=m.decay_shape)
        average_into_model(self.model, [c.path for c in chosen], weights)
        self.log_lines.append(f"PMA-init: {m.method} of iterations {[c.iteration for c in chosen]} of {m.root}")

    def _start_annealing_branch(self, own_checkpoints) -> TrainState:
        """Fork from checkpoint.load (weights, optimizer, data position) and anneal to train.iters;
        a restarted branch resumes from its own checkpoints."""
        t = self.cfg.train
        self.resumed_from = layout.resolve_checkpoint(own_checkpoints or self.cfg.checkpoint.load)
        state = load_checkpoint(self.resumed_from, self.model, self.optimizer, None)
        start = state.extra.setdefault("anneal_start_iteration", state.iteration)
        if t.iters <= start:
            raise ConfigError(f"train.iters: {t.iters} must be beyond the fork's iteration {start} for an annealing branch")
        self.scheduler = build_annealing_scheduler(self.optimizer, start, t.lr, t.min_lr, t.iters - start,
                                                   self.cfg.schedule.decay_shape, weight_decay=t.weight_decay)
        self.scheduler.step(increment=state.iteration - start)
        self.log_lines.append(f"annealing branch: from iteration {start} (lr {t.lr:g}) to {t.iters} "
                              f"(lr {t.min_lr:g}, {self.cfg.schedule.decay_shape})")
        return state

    def _data_iterators(self, consumed_samples: int):
        dp_rank = parallel_state.get_data_parallel_rank()
        make = lambda: MicroBatchIterator(self.train_ds, self.cfg.train.micro_batch_size,  # noqa: E731
                                          dp_rank, self.dp_size, consumed_samples,
                                          num_workers=self.cfg.data.num_workers)
        # Each virtual pipeline chunk pulls its own copy of the same micro-batch sequence.
        return [make() for _ in self.model] if len(self.model) > 1 else make()

    def _eval_iterators(self):
        dp_rank = parallel_state.get_data_parallel_rank()
        make = lambda: iter(EvalIterator(self.valid_ds, self.cfg.train.micro_batch_size, dp_rank, self.dp_size))  # noqa: E731
        return [make() for _ in self.model] if len(self.model) > 1 else make()

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        self.stop_signals = StopSignals(self.cfg.train.exit_signals).install()
        try:
            return self._train()
        finally:
            self.stop_signals.restore()

    def _train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.log.print(f"pma-train: {self._describe()}")
        for line in self.log_lines:
            self.log.print(line)
        start_iter, start_time = self.state.iteration, time.perf_counter()
        preempted = None
        window = _Window()
        last_eval = None
        # eval_iters=0 turns evaluation off, as in Megatron-LM: no validation loss is logged.
        evaluating = t.eval_iters > 0
        if t.eval_at_start and evaluating:
            last_eval = self.evaluate()
            self.log.log(start_iter, {"loss": last_eval, "consumed_tokens": self.state.consumed_tokens}, kind="val")
        stop_at = t.iters if t.exit_after_iters is None else min(t.iters, start_iter + t.exit_after_iters)
        while self.state.iteration < stop_at:
            step_start = time.perf_counter()
            self._maybe_inject_spike()
            result = self.train_step()
            async_save.maybe_finalize()  # publishes a checkpoint written behind training, once all ranks wrote it
            window.add(result, time.perf_counter() - step_start)
            self.train_seconds += time.perf_counter() - step_start
            it = self.state.iteration
            cause = self.detector.check(result.loss, result.grad_norm) if self.detector else None
            if cause is not None:
                self._recover(it, cause)
                window, _ = _Window(), self.timer.pop()
                continue
            self.log.advance(1, loss=result.loss, lr=result.lr)
            if it % t.log_interval == 0 or it == t.iters:
                self.log.log(it, {"loss": window.mean_loss(), "lr": result.lr, "grad_norm": result.grad_norm,
                                  "tokens_per_s": self.tokens_per_iter * window.steps / window.seconds,
                                  "step_s": window.seconds / window.steps,
                                  "consumed_tokens": self.state.consumed_tokens,
                                  "skipped_steps": window.skipped, **self._flops(window), **window.breakdown(self.timer.pop()),
                                  **(self.moe_metrics.report(window.steps, self.num_microbatches)
                                     if self.moe_metrics else {})},
                             console=("loss", "lr", "grad_norm", "tokens_per_s", "step_s", "mfu", "moe_load_balancing_loss",
                                      "moe_z_loss", "moe_load_imbalance"))
                window = _Window()
            if it % cfg.checkpoint.interval == 0 or (it == t.iters and cfg.checkpoint.save_at_end):
                self.save()
                if self.tracker is not None and it % self.track_spacing == 0:
                    track_start = time.perf_counter()
                    self.tracker.add(it)
                    self.track_seconds += time.perf_counter() - track_start
            if result.stop and it < t.iters:  # the last iteration finishes as usual
                preempted = self._stop_on_signal()
                break
            if evaluating and (it % t.eval_interval == 0 or it == t.iters):
                last_eval = self.evaluate()
                self.log.log(it, {"loss": last_eval, "consumed_tokens": self.state.consumed_tokens,
                                  **self._evaluate_merge()}, kind="val")
        async_save.wait()  # the last checkpoint is published before the job ends (preempted or not)
        elapsed = time.perf_counter() - start_time
        summary = {"iterations": self.state.iteration - start_iter, "final_iteration": self.state.iteration,
                   "val_loss": last_eval, "seconds": elapsed, "run_dir": str(self.run_dir),
                   "train_step_seconds": self.train_seconds, "track_seconds": self.track_seconds,
                   "preempted": preempted}
        if self.tracker is not None:
            self.log.log(self.state.iteration, {"train_step_seconds": self.train_seconds,
                                                "track_snapshot_seconds": self.track_seconds,
                                                "track_overhead": self.track_seconds / max(self.train_seconds, 1e-9),
                                                "track_snapshot_bytes": self.tracker.snapshot_bytes()},
                         kind="track")
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
            self.scheduler.step(increment=scheduler_increment(t))
        self.timer.mark("optimizer")
        loss, _, stop = reduce_lm_loss(losses, self.platform.device, self.stop_signals.requested)
        self.timer.mark("loss_reduce")
        self.state.iteration += 1
        self.state.consumed_samples += t.global_batch_size
        self.state.consumed_tokens += self.tokens_per_iter
        lr = self.optimizer.param_groups[0]["lr"]
        return StepResult(loss, float(grad_norm or 0.0), lr, not updated, {"data": self.data_timer.pop()}, stop)

    @torch.no_grad()
    @rng.preserved()  # training's random streams are the same however often it evaluates
    def evaluate(self) -> float:
        for chunk in self.model:
            chunk.eval()
        iterators = self._eval_iterators()
        records = []
        for _ in range(self.cfg.train.eval_iters):
            records += self.forward_backward(
                forward_step_func=self.forward_step, data_iterator=iterators, model=self.model,
                num_microbatches=self.num_microbatches, seq_length=self.cfg.train.seq_length,
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=True)
        self.data_timer.pop()
        for chunk in self.model:
            chunk.train()
        return reduce_lm_loss(records, self.platform.device)[0]

    def _maybe_inject_spike(self) -> None:
        """Testing aid: inject_iters consecutive steps at LR x inject_lr_mult, once per run."""
        sp = self.cfg.spike
        if sp.inject_at is None or self._spike_steps_left == 0 or self.state.iteration < sp.inject_at:
            return
        if self._spike_steps_left is None:
            self._spike_steps_left = sp.inject_iters
        self._spike_steps_left -= 1
        for group in self.optimizer.param_groups:
            group["lr"] *= sp.inject_lr_mult

    def _recover(self, iteration: int, cause: str) -> None:
        """Restore the merge of the last good checkpoints; optimizer from the newest of them."""
        from pma_train.merge.live import average_into_model
        from pma_train.merge.weights import sma

        sp = self.cfg.spike
        async_save.wait()  # the checkpoint in flight may be one to recover from
        good = [i for i in layout.list_iterations(self.ckpt_root) if i <= iteration - sp.guard_iters][-sp.merge_last:]
        if not good:
            raise RuntimeError(f"loss spike at iteration {iteration} ({cause}) and no checkpoint saved at least "
                               f"{sp.guard_iters} iterations before it to recover from: stopping")
        if not self.recovery_budget.allow(iteration):
            raise RuntimeError(f"loss spike at iteration {iteration} ({cause}): more than {sp.max_recoveries} "
                               f"recoveries within {sp.recovery_window} iterations, the run does not recover: stopping")
        samples, tokens = self.state.consumed_samples, self.state.consumed_tokens
        paths = [self.ckpt_root / layout.iter_dir_name(i) for i in good]
        self.state = load_checkpoint(paths[-1], self.model, self.optimizer if sp.restore_optimizer else None,
                                     self.scheduler)
        average_into_model(self.model, paths, sma(len(paths)))
        self.optimizer.reload_model_params()
        self.last_saved_iteration = None  # the iterations ahead are trained again
        skipped = samples - self.state.consumed_samples if sp.skip_data else 0
        if sp.skip_data:  # go on past the data that led into the spike
            self.state.consumed_samples, self.state.consumed_tokens = samples, tokens
        self.train_iters = self._data_iterators(self.state.consumed_samples)
        if self.tracker is not None:
            while self.tracker.snapshots and self.tracker.snapshots[-1][0] > self.state.iteration:
                self.tracker.snapshots.pop()
        # Checkpoints saved after the restored point may hold the spike: a job that died before
        # re-saving them would resume from one. Move them aside (not deleted).
        set_aside = layout.set_aside(self.ckpt_root, self.state.iteration, f"spiked-at-{iteration}") if self.rank0 else []
        dist.barrier()
        self.log.log(iteration, {"cause": cause, "restored_iteration": self.state.iteration, "merged_iterations": good,
                                 "optimizer_from": good[-1] if sp.restore_optimizer else None,
                                 "skipped_samples": skipped, "set_aside_iterations": set_aside},
                     kind="recovery")

    def _build_tracker(self):
        tr = self.cfg.track
        if not tr.enabled:
            return None, None
        from pma_train.merge.track import MergeTracker

        tracker, spacing = MergeTracker.for_model(self.model, tr), track_spacing_iters(self.cfg)
        # A resumed run rebuilds its window from the grid checkpoints it already wrote.
        grid = [i for i in layout.list_iterations(self.ckpt_root) if i % spacing == 0 and i <= self.state.iteration]
        for iteration in grid[-tr.n:]:
            with tracker.loaded(self.model, self.ckpt_root / layout.iter_dir_name(iteration)):
                tracker.add(iteration)
        return tracker, spacing

    def _evaluate_merge(self) -> dict:
        """Validation loss of the tracked merge (and its save), once its window is full."""
        if self.tracker is None or not self.tracker.ready:
            return {}
        with self.tracker.swapped_in():
            loss = self.evaluate()
            if self.cfg.track.save:
                save_checkpoint(self.run_dir / "merged", self.model, None, None, self.state,
                                megatron_args(self.cfg, self.state, self.tokenizer.vocab_size),
                                sidecar={"pma_track": {"iterations": self.tracker.iterations,
                                                       "weights": self.tracker.weights(),
                                                       "method": self.cfg.track.method}})
                keep = self.cfg.track.save_keep_last
                if keep is not None and self.rank0:
                    prune(self.run_dir / "merged", keep, None, None)
        return {"loss_merged": loss, "merged_iterations": self.tracker.iterations}

    def _stop_on_signal(self) -> str:
        """Every rank agreed to stop after this step: save (unless just saved), record it."""
        it = self.state.iteration
        path = None
        if self.cfg.checkpoint.save_on_signal:
            path = self.save() if self.last_saved_iteration != it else self.ckpt_root / layout.iter_dir_name(it)
        # A rank the signal did not reach stops too; it knows only that another rank got one.
        name = self.stop_signals.first() or "signal on another rank"
        self.log.log(it, {"signal": name, "checkpoint": None if path is None else str(path),
                          "exit_code": PREEMPTED_EXIT_CODE}, kind="preempted")
        return name

    def save(self) -> Path:
        path = save_checkpoint(self.ckpt_root, self.model, self.optimizer if self.cfg.checkpoint.save_optimizer else None,
                               self.scheduler, self.state, megatron_args(self.cfg, self.state, self.tokenizer.vocab_size),
                               check_space=self.cfg.checkpoint.check_free_space, in_background=self.async_save)
        self.last_saved_iteration = self.state.iteration
        if self.cfg.checkpoint.retention.enabled and self.rank0:
            async_save.after_current(self._prune)  # after the publish: retention counts published checkpoints
        return path

    def _prune(self) -> None:
        r, tr = self.cfg.checkpoint.retention, self.cfg.track
        grid_every = r.grid_every or (track_spacing_iters(self.cfg) if tr.enabled else None)
        grid_last = r.grid_last if r.grid_last is not None else (tr.n if tr.enabled else None)
        # Spike recovery merges the last few checkpoints: keep enough of them.
        keep_last = max(r.keep_last, self.cfg.spike.merge_last + 1 if self.cfg.spike.enabled else 0)
        deleted = prune(self.ckpt_root, keep_last, grid_every, grid_last)
        if deleted:
            self.log.log(self.state.iteration, {"deleted_iterations": deleted}, kind="retention")

    # ------------------------------------------------------------------ small things

    def _flops(self, window: "_Window") -> dict[str, float]:
        """Model TFLOP/s per rank, and MFU where the GPU's peak is known."""
        per_rank = self.flops_per_token * self.tokens_per_iter * window.steps / window.seconds / dist.get_world_size()
        out = {"tflops_per_rank": per_rank / 1e12}
        if self.peak_flops:
            out["mfu"] = per_rank / self.peak_flops
        return out

    def _describe(self) -> str:
        p = self.cfg.parallel
        params = sum(p_.numel() for chunk in self.model for p_ in chunk.parameters())
        return (f"model {self.cfg.model.name} ({params / 1e6:.2f}M params on rank 0) | world {dist.get_world_size()} "
                f"= tp {p.tp} x pp {p.pp}{f' (vpp {p.vpp})' if p.vpp else ''} x dp {self.dp_size} (ep {p.ep}) | "
                f"{self.platform.device.type}/{self.platform.backend} | start iteration {self.state.iteration} | "
                f"run dir {self.run_dir}")


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


def _same_config_on_all_ranks(cfg: JobConfig) -> JobConfig:
    # Interpolations such as ${now:...} may resolve differently per rank: rank 0's version wins.
    holder = [cfg]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def megatron_args(cfg: JobConfig, state: TrainState, vocab_size: int) -> Namespace:
    """The subset of Megatron-LM's argparse namespace its loader and tools read from checkpoints."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    from pma_train.model import padded_vocab_size

    return Namespace(
        num_layers=len(m.pattern().replace("|", "")), hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups is not None, kv_channels=m.kv_channels,
        hybrid_layer_pattern=m.pattern(), normalization=m.normalization, swiglu=m.activation == "swiglu",
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights, add_bias_linear=m.add_bias_linear,
        num_experts=m.num_experts, moe_router_topk=m.moe_router_topk,
        max_position_embeddings=m.max_position_embeddings, seq_length=t.seq_length,
        padded_vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by),
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, expert_model_parallel_size=p.ep,
        use_distributed_optimizer=p.use_distributed_optimizer, ckpt_format="torch_dist",
        train_iters=t.iters, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
        consumed_train_samples=state.consumed_samples, consumed_valid_samples=0, iteration=state.iteration,
        lr=t.lr, min_lr=t.min_lr, seed=cfg.seed,
    )
