"""The forward step megatron-core's pipeline schedules call per micro-batch, its loss, and the
validation loss (the trainer's and pma-eval's)."""

from __future__ import annotations

import time
from functools import partial

import torch

from pma_train.checkpoint import rng


class DataTimer:
    """Seconds spent waiting for batches inside the schedules (part of the step-time breakdown)."""

    def __init__(self):
        self.seconds = 0.0

    def pop(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class PhaseTimer:
    """Seconds per phase of the train step (fwd_bwd, optimizer, ...), summed until popped.

    On CUDA each phase is timed with events that are read only when popped (at log steps), so
    timing never makes the host wait for the GPU inside a step. On CPU the work is synchronous and
    the wall clock is exact.
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._last = None
        self._pending: list[tuple[str, object, object]] = []
        self._seconds: dict[str, float] = {}

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._last = self._now()

    def mark(self, phase: str) -> None:
        """The phase that began at the previous mark (or start) ends now."""
        now = self._now()
        if self.cuda:
            self._pending.append((phase, self._last, now))
        else:
            self._seconds[phase] = self._seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def pop(self) -> dict[str, float]:
        if self._pending:
            self._pending[-1][2].synchronize()
            for phase, begin, end in self._pending:
                self._seconds[phase] = self._seconds.get(phase, 0.0) + begin.elapsed_time(end) / 1000
            self._pending.clear()
        seconds, self._seconds = self._seconds, {}
        return seconds


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    # (loss, tokens, reporting): the schedules divide by tokens and micro-batches for backward.
    return loss_sum, num_tokens, {"lm_loss": torch.stack([loss_sum.detach(), mask.sum()])}


def make_forward_step(device: torch.device, data_timer: DataTimer):
    def forward_step(data_iterator, model):
        start = time.perf_counter()
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        data_timer.seconds += time.perf_counter() - start
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(_loss_func, loss_mask)

    return forward_step


def reduce_lm_loss(losses_reduced: list[dict], device: torch.device,
                   stop_requested: bool = False) -> tuple[float, float, bool]:
    """Mean loss per token over the global batch, its token count, and whether any rank asks to
    stop (an exit signal, pma_train/train/preemption.py), the same on every rank.

    Only the last pipeline stage holds losses, and its TP ranks hold the same value: those with
    tp rank 0 contribute, everyone else adds zeros, and one all-reduce over the world sums the
    data-parallel replicas. The stop requests ride on the same all-reduce (a sum > 0: some rank
    asked), so agreeing on them costs no extra collective.
    """
    from megatron.core import parallel_state
    import torch.distributed as dist

    total = torch.zeros(3, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
        for record in losses_reduced:
            total[:2] += record["lm_loss"].to(total)
    total[2] = float(stop_requested)
    dist.all_reduce(total)
    loss, tokens, stops = total.tolist()
    return loss / max(tokens, 1.0), tokens, stops > 0


@torch.no_grad()
@rng.preserved()  # training's random streams are the same however often it evaluates
def validation_loss(parts, forward_step) -> float:
    """Mean loss per token over train.eval_iters global batches of the validation data, from its
    first batch, of the model in `parts` (pma_train/train/components.py)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = parts.cfg.train
    forward_backward = get_forward_backward_func()
    for chunk in parts.model:
        chunk.eval()
    iterators = parts.eval_iterators()
    records = []
    for _ in range(t.eval_iters):
        records += forward_backward(
            forward_step_func=forward_step, data_iterator=iterators, model=parts.model,
            num_microbatches=parts.num_microbatches, seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=True)
    for chunk in parts.model:
        chunk.train()
    return reduce_lm_loss(records, parts.platform.device)[0]
