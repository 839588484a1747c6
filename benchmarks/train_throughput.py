"""Training throughput of pma-train against a bare megatron-core loop, in the same run.

Both sides train the same HybridModel (built by `pma_train.model.build_model` on the same
platform layer and process groups), wrapped in the same megatron-core DDP and optimizer
(`pma_train.train.optim`), with the same LR schedule, batch and parallel layout:

- bare:      the smallest correct driver in the style of megatron-core's
             examples/run_simple_mcore_train_loop.py: zero grads, `get_forward_backward_func`,
             optimizer.step, scheduler.step. Batches are pre-built from the same dataset
             (`--bare-data live` reads them per step instead). No logging, metrics, loss
             all-reduce, eval or checkpointing.
- pma-train: the real `Trainer.train()` loop (train_step, loss all-reduce, metrics, logging at
             its normal interval), with eval and checkpointing pushed past the end of the run.

Measurement: each side first runs `--warmup` steps (discarded), then `--rounds` blocks of
`--steps` steps each (default: 100 x 1), alternating pma/bare, bare/pma, ... so machine noise hits
both alike. Reported: tokens/s at the median step with the p10-p90 spread, the ratio, the per-step
breakdown, and pma-train's overhead measured directly (its data, loss all-reduce, bookkeeping and
logging time), which machine noise does not move, and a control: a second, identical bare loop
in the same alternation, whose ratio to the first shows how finely the machine can measure (on a
busy 2-core host, 2-rank runs differ by several percent between two identical loops). All start
from the same weights and see the
same batches in the same order, so their losses must agree step for step (checked and reported).
Results are merged into benchmarks/results/train_throughput.json (one entry per case) and
rendered as train_throughput.md and train_throughput.png.

    python benchmarks/train_throughput.py                                   # tiny, 1 rank
    python benchmarks/train_throughput.py --label h256x4 model.hidden_size=256 model.num_layers=4
    torchrun --nproc-per-node 2 benchmarks/train_throughput.py --tp 2        # tp=2 over gloo

Trailing `key=value` arguments are hydra overrides of pma-train's config (they win over the
flags). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform as host_platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASENAME = "train_throughput"
TARGET_RATIO = 0.97


# ----------------------------------------------------------------------------- configuration

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny", help="a preset of model_configs/")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (dp = world / (tp*pp))")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=1,
                   help="timed steps per block; 1 alternates the sides every step")
    p.add_argument("--rounds", type=int, default=100, help="timed blocks per side (alternating order)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side before the blocks")
    p.add_argument("--log-interval", type=int, default=None,
                   help="pma-train's train.log_interval (none: the config's, 10)")
    p.add_argument("--progress-bar", action="store_true",
                   help="leave pma-train's tqdm bar on (it only shows on a terminal)")
    p.add_argument("--bare-data", choices=("prebuilt", "live"), default="prebuilt",
                   help="bare loop batches: built before timing, or read from the dataset each step")
    p.add_argument("--pma-data", choices=("loader", "prebuilt"), default="loader",
                   help="diagnostic: 'prebuilt' feeds the trainer the bare loop's pre-built batches "
                        "(same samples) instead of its own loader, to separate the loader's cost")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="leave out the control: a second, identical bare loop whose ratio to the first "
                        "shows how finely this machine can measure")
    p.add_argument("--label", default=None, help="case name in the results (none: <model>-tp<tp>-pp<pp>-dp<dp>)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="drop earlier cases from the results JSON")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("overrides", nargs="*", help="hydra overrides of pma-train's config, e.g. model.hidden_size=256")
    return p.parse_args(argv)


def compose_config(args: argparse.Namespace, run_dir: str):
    """pma-train's JobConfig, composed by hydra exactly as `pma-train` composes it."""
    from hydra import compose, initialize_config_dir

    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config

    total = args.warmup + args.rounds * args.steps + 1  # + the untimed last step (make_schedule)
    overrides = [
        f"model={args.model}",
        f"parallel.tp={args.tp}", f"parallel.pp={args.pp}",
        f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={args.micro_batch}",
        f"train.seq_length={args.seq_len}",
        # One more than the run takes, so the end-of-run eval / save never fires; eval and
        # checkpoints are pushed out of reach.
        f"train.iters={total + 1}", "train.eval_interval=1000000000", "train.eval_iters=1",
        "checkpoint.interval=1000000000", "checkpoint.save_at_end=false",
        f"logging.progress_bar={str(args.progress_bar).lower()}", f"run.dir={run_dir}",
    ]
    if args.log_interval is not None:
        overrides.append(f"train.log_interval={args.log_interval}")
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = to_job_config(compose("train", overrides=overrides + list(args.overrides)))
    # The constant schedule needs warmup < iters; only matters for very short smoke runs.
    cfg.schedule.warmup_iters = min(cfg.schedule.warmup_iters, cfg.train.iters - 1)
    return cfg


class GcClock:
    """Seconds spent in Python's cyclic garbage collector (it runs inside whichever step allocates)."""

    def __init__(self):
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


GC_CLOCK = GcClock()


# ----------------------------------------------------------------------------- the bare loop

class BareLoop:
    """The smallest correct megatron-core training driver around the same model and optimizer.

    In the style of megatron-core's examples/run_simple_mcore_train_loop.py; everything
    pma-train adds around a step (logging, metrics, loss all-reduce, eval, checkpoints) is left out.
    """

    def __init__(self, cfg, dataset, live_data: bool):
        import torch
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from pma_train.data import build_tokenizer
        from pma_train.model import build_model
        from pma_train.parallel import init_distributed
        from pma_train.platform import detect
        from pma_train.schedule import build_scheduler
        from pma_train.train.optim import build_optimizer, wrap_ddp

        self.torch = torch
        self.cfg, t = cfg, cfg.train
        self.platform = detect(cfg.parallel.backend)
        if not parallel_state.model_parallel_is_initialized():  # the Trainer of this run already did
            init_distributed(cfg.parallel, self.platform, cfg.seed)
        chunks = build_model(cfg, self.platform, build_tokenizer(cfg.data.tokenizer).vocab_size)
        self.model = wrap_ddp(chunks, chunks[0].config, cfg)
        self.optimizer = build_optimizer(self.model, cfg, chunks[0].config)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, t, t.global_batch_size * t.seq_length)
        self.forward_backward = get_forward_backward_func()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.dataset, self.live_data = dataset, live_data
        # One generator per model chunk (virtual pipeline stages each pull the same sequence).
        self._data = [self._batches() for _ in self.model] if len(self.model) > 1 else self._batches()
        self.prebuilt: list = []
        self.data_s = 0.0
        self.records: list[dict] = []  # per step: seconds; the loss tensors are read after timing
        self.losses: list = []

    # Megatron-LM's sampler order (rank r takes the r-th micro-batch slice of each chunk of
    # micro_batch * dp samples): the same samples pma-train's loader yields, step for step.
    def _read(self, k: int) -> dict:
        mbs = self.cfg.train.micro_batch_size
        start = k * mbs * self.dp_size + self.dp_rank * mbs
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(mbs)]
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        return {key: self.torch.stack([self.torch.as_tensor(s[key]) for s in samples]) for key in keys}

    def prebuild(self, steps: int) -> None:
        if not self.live_data:
            self.prebuilt = [self._read(k) for k in range(steps * self.num_microbatches)]

    def _batches(self):
        k = 0
        while True:
            yield self.prebuilt[k] if k < len(self.prebuilt) else self._read(k)
            k += 1

    def _loss_func(self, loss_mask, output_tensor):
        losses = output_tensor.float().reshape(-1)
        mask = loss_mask.float().reshape(-1)
        loss_sum = self.torch.sum(losses * mask)
        num_tokens = mask.sum()
        return loss_sum, num_tokens.to(self.torch.int), {"lm loss": self.torch.stack([loss_sum.detach(), num_tokens])}

    def _forward_step(self, data_iterator, model):
        start = time.perf_counter()
        batch = next(data_iterator)
        device = self.platform.device
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        loss_mask, position_ids = batch["loss_mask"].to(device), batch["position_ids"].to(device)
        self.data_s += time.perf_counter() - start
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(self._loss_func, loss_mask)

    def _sync(self) -> None:
        if self.platform.is_cuda:
            self.torch.cuda.synchronize()

    def train_step(self) -> None:
        t = self.cfg.train
        gc_start = GC_CLOCK.total
        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self.forward_backward(
            forward_step_func=self._forward_step, data_iterator=self._data, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=False)
        self._sync()
        mid = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step(increment=1)
        self._sync()
        end = time.perf_counter()
        data_s, self.data_s = self.data_s, 0.0
        self.losses.append(losses)
        self.records.append({"step_s": end - start, "data": data_s, "fwd_bwd": mid - start - data_s,
                             "optimizer": end - mid, "gc": GC_CLOCK.total - gc_start})

    def global_losses(self) -> list[float]:
        """Mean loss per token of each step over the global batch (after timing: one all-reduce)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        torch = self.torch
        totals = torch.zeros(len(self.losses), 2, dtype=torch.float64)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if last_stage and parallel_state.get_tensor_model_parallel_rank() == 0:
            for i, step in enumerate(self.losses):
                for record in step:
                    totals[i] += record["lm loss"].to(totals)
        totals = totals.to(self.platform.device)
        dist.all_reduce(totals)
        return (totals[:, 0] / totals[:, 1].clamp(min=1)).tolist()


# ----------------------------------------------------------------------------- the pma-train side

@dataclass
class Block:
    side: str  # "pma" or "bare"
    steps: int
    timed: bool
    done: int = 0


class Interleaved:
    """Runs the real `Trainer.train()` once, and the bare loops' blocks in between its steps.

    `loops` are the bare loops by side name: "bare", and "control" (unless --no-control), a second,
    identical bare loop whose ratio to the first shows what the measurement itself can resolve.
    `Trainer.train_step` is wrapped to take timestamps and, where the schedule says so, to run
    bare blocks before the next pma-train step starts. A pma-train step's wall time runs from its
    `train_step` call to the moment the loop asks for the next step (or `train()` returns), so it
    includes what the loop does after the step (metrics, logging at its interval); the time spent
    in bare blocks is never part of it.
    """

    def __init__(self, trainer, loops: dict[str, BareLoop], schedule: list[Block], on_block=None):
        self.trainer, self.loops, self.schedule = trainer, loops, list(schedule)
        sides = ["pma", *loops]
        self.blocks: dict[str, list[list[dict]]] = {side: [] for side in sides}  # timed blocks of step records
        self.losses: list[float] = []  # every pma-train step, warm-up included
        self.on_block = on_block  # called with the counts of finished timed blocks after each one
        self.done = {side: 0 for side in sides}
        self._inner = trainer.train_step
        self._open: dict | None = None  # the pma-train step in flight

    def _close_pma_step(self, now: float) -> None:
        step, self._open = self._open, None
        if step is None or not step["block"].timed:
            return
        s = step["seconds"]
        self.blocks["pma"][-1].append({
            "step_s": now - step["start"], "data": s["data"], "fwd_bwd": s["fwd_bwd"],
            "optimizer": s["optimizer"], "loss_reduce": s["loss_reduce"],
            "step_other": step["train_step_s"] - sum(s.values()),
            "loop_logging": now - step["start"] - step["train_step_s"], "gc": GC_CLOCK.total - step["gc_start"]})
        if step["block"].done == step["block"].steps:
            self._finished("pma")

    def _finished(self, side: str) -> None:
        self.done[side] += 1
        if self.on_block:
            self.on_block(self.done)

    def _advance(self) -> None:
        """Drop finished pma-train blocks and run the bare blocks due before the next one."""
        while self.schedule:
            head = self.schedule[0]
            if head.side == "pma" and head.done < head.steps:
                return
            self.schedule.pop(0)
            if head.side != "pma":
                loop = self.loops[head.side]
                before = len(loop.records)
                for _ in range(head.steps):
                    loop.train_step()
                if head.timed:
                    self.blocks[head.side].append(loop.records[before:])
                    self._finished(head.side)

    def _train_step(self):
        self._close_pma_step(time.perf_counter())
        self._advance()
        block = self.schedule[0]
        if block.timed and block.done == 0:
            self.blocks["pma"].append([])
        block.done += 1
        gc_start = GC_CLOCK.total
        start = time.perf_counter()
        result = self._inner()
        train_step_s = time.perf_counter() - start
        # This step's phases (the trainer's own log lines then miss them: they are not measured here).
        seconds = {**result.seconds, **self.trainer.timer.pop()}
        seconds["fwd_bwd"] -= seconds["data"]
        self._open = {"start": start, "train_step_s": train_step_s, "seconds": seconds,
                      "block": block, "gc_start": gc_start}
        self.losses.append(result.loss)
        return result

    def run(self) -> None:
        tr = self.trainer
        tr.cfg.train.exit_after_iters = sum(b.steps for b in self.schedule if b.side == "pma")
        tr.train_step = self._train_step
        try:
            tr.train()
            self._close_pma_step(time.perf_counter())
        finally:
            tr.train_step = self._inner
        self._advance()


def make_schedule(sides: list[str], warmup: int, rounds: int, steps: int) -> list[Block]:
    """Warm-up of each side (untimed), then rounds of one block per side, in an order that
    reverses every round (AB BA AB ..., ABC CBA ...)."""
    schedule = [Block(side, warmup, False) for side in sides]
    for r in range(rounds):
        schedule += [Block(side, steps, True) for side in (sides if r % 2 == 0 else sides[::-1])]
    # One untimed pma-train step last: the final timed step then ends where the loop asks for the
    # next step, like every other, not after train()'s end-of-run summary.
    schedule.append(Block("pma", 1, False))
    return [b for b in schedule if b.steps > 0]


# ----------------------------------------------------------------------------- statistics

def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(records: list[dict], blocks: list[list[dict]], tokens_per_step: int) -> dict:
    step_s = [r["step_s"] for r in records]
    keys = [k for k in records[0] if k != "step_s"]
    breakdown_ms = {k: 1e3 * statistics.fmean(r[k] for r in records) for k in keys}
    median_ms = {k: 1e3 * statistics.median(r[k] for r in records) for k in keys}
    block_tps = [tokens_per_step * len(b) / sum(r["step_s"] for r in b) for b in blocks]
    return {
        "steps": len(step_s),
        "median_step_ms": 1e3 * statistics.median(step_s),
        "p10_step_ms": 1e3 * _quantile(step_s, 0.1),
        "p90_step_ms": 1e3 * _quantile(step_s, 0.9),
        "mean_step_ms": 1e3 * statistics.fmean(step_s),
        "tokens_per_s_median": tokens_per_step / statistics.median(step_s),
        "tokens_per_s_mean": tokens_per_step * len(step_s) / sum(step_s),
        "tokens_per_s_blocks": block_tps,
        "breakdown_ms": breakdown_ms,
        "breakdown_median_ms": median_ms,
    }


# ----------------------------------------------------------------------------- the run

def run(args: argparse.Namespace) -> dict | None:
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun sets 1 per rank; a plain run gets the cores
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from pma_train.train.trainer import Trainer

    scratch = tempfile.mkdtemp(prefix="pma-bench-")
    cfg = compose_config(args, str(Path(scratch) / "run"))  # Trainer validates it
    t = cfg.train
    tokens_per_step = t.global_batch_size * t.seq_length
    total_steps = args.warmup + args.rounds * args.steps

    trainer = Trainer(cfg)  # initialises the process groups; the bare loop reuses them
    rank0 = dist.get_rank() == 0
    loops = {"bare": BareLoop(trainer.cfg, trainer.parts.train_data, live_data=args.bare_data == "live")}
    if args.control:
        loops["control"] = BareLoop(trainer.cfg, trainer.parts.train_data, live_data=args.bare_data == "live")
    for loop in loops.values():
        loop.prebuild(total_steps + 1)
    bare = loops["bare"]
    if args.pma_data == "prebuilt":  # the same micro-batch sequence the trainer's loader would yield
        trainer.train_iters = [bare._batches() for _ in trainer.model] if len(trainer.model) > 1 else bare._batches()
    same = torch.tensor([float(all(torch.equal(a, b) for loop in loops.values()
                                   for ca, cb in zip(trainer.model, loop.model)
                                   for a, b in zip(ca.parameters(), cb.parameters())))],
                        device=trainer.platform.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    same_init = bool(same.item())

    def say(line: str) -> None:
        if rank0:
            print(f"[bench] {line}", flush=True)

    def report_round(done: dict[str, int]) -> None:
        n = done["pma"]
        if len(set(done.values())) > 1:
            return  # the round's other blocks are still to come
        last = {s: tokens_per_step * args.steps / sum(x["step_s"] for x in runner.blocks[s][-1]) for s in runner.blocks}
        if n % max(1, args.rounds // 10) == 0 or n == args.rounds:
            say(f"round {n}/{args.rounds}: " + ", ".join(f"{s} {v:,.0f} tok/s" for s, v in last.items())
                + f", ratio {last['pma'] / last['bare']:.3f}")

    world, dp = dist.get_world_size(), parallel_state.get_data_parallel_world_size()
    say(f"world {world} = tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x dp {dp}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {args.rounds} rounds x {args.steps} steps per side "
        f"after {args.warmup} warm-up steps, same initial weights: {same_init}")
    schedule = make_schedule(["pma", *loops], args.warmup, args.rounds, args.steps)
    runner = Interleaved(trainer, loops, schedule, report_round)
    gc.collect()
    dist.barrier()
    load_before = os.getloadavg()
    runner.run()
    blocks = runner.blocks
    for side in blocks:  # after timing: the data time of the slowest rank, which a step waits for
        records = [r for b in blocks[side] for r in b]
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, [r["data"] for r in records])
        for record, values in zip(records, zip(*every)):
            record["data_slowest_rank"] = max(values)

    pma_losses = runner.losses  # every step the trainer ran, warm-up included, like the bare lists
    loss_diff = max(abs(a - b) for loop in loops.values() for a, b in zip(pma_losses, loop.global_losses()))
    dist.barrier()
    shutil.rmtree(scratch, ignore_errors=True)
    if not rank0:
        return None

    side_stats = {s: summarise([r for b in blocks[s] for r in b], blocks[s], tokens_per_step) for s in blocks}
    pair_ratios = [p / b for p, b in zip(side_stats["pma"]["tokens_per_s_blocks"],
                                         side_stats["bare"]["tokens_per_s_blocks"])]
    m = trainer.cfg.model
    import megatron.core

    result = {
        "label": args.label or f"{m.name}-tp{cfg.parallel.tp}-pp{cfg.parallel.pp}-dp{dp}",
        "model": {"name": m.name, "pattern": m.pattern(), "hidden_size": m.hidden_size,
                  "ffn_hidden_size": m.ffn_hidden_size, "num_attention_heads": m.num_attention_heads,
                  "params_rank0": sum(p.numel() for c in trainer.model for p in c.parameters())},
        "layout": {"world": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp,
                   "sequence_parallel": cfg.parallel.sequence_parallel and cfg.parallel.tp > 1},
        "batch": {"global": t.global_batch_size, "micro": t.micro_batch_size, "seq_len": t.seq_length,
                  "microbatches_per_step": trainer.num_microbatches, "tokens_per_step": tokens_per_step},
        "run": {"warmup": args.warmup, "rounds": args.rounds, "steps_per_block": args.steps,
                "log_interval": t.log_interval, "bare_data": args.bare_data, "pma_data": args.pma_data,
                "overrides": list(args.overrides),
                "progress_bar": args.progress_bar},
        "env": {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(), "device": trainer.platform.device.type, "backend": trainer.platform.backend,
                "precision": str(trainer.parts.model_config.params_dtype).replace("torch.", ""),
                "torch": torch.__version__, "megatron_core": megatron.core.__version__,
                "python": host_platform.python_version(), "host": host_platform.processor() or host_platform.machine(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "loadavg_1min_start_end": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "bare": side_stats["bare"],
        "pma": side_stats["pma"],
        # Headline: tokens/s at the median step time (robust to other load on the machine).
        "ratio": side_stats["pma"]["tokens_per_s_median"] / side_stats["bare"]["tokens_per_s_median"],
        # Over all timed steps (every slow step counts, from us or from the machine).
        "ratio_mean": side_stats["pma"]["tokens_per_s_mean"] / side_stats["bare"]["tokens_per_s_mean"],
        "ratio_rounds": pair_ratios,
        "ratio_rounds_median": statistics.median(pair_ratios),
        "control": side_stats.get("control"),
        "control_ratio": (side_stats["control"]["tokens_per_s_median"] / side_stats["bare"]["tokens_per_s_median"]
                          if "control" in side_stats else None),
        "same_initial_weights": same_init,
        "max_loss_diff": loss_diff,
        "final_loss": pma_losses[-1],
    }
    # What pma-train adds per step, measured directly (forward/backward and optimizer run the same
    # code on both sides): robust to machine noise, unlike the difference of two step times.
    # Medians, except for logging, which happens on one step in log_interval; a median would
    # also ignore the time a collective waits for a rank the machine descheduled.
    pma_ms, bare_ms = side_stats["pma"]["breakdown_median_ms"], side_stats["bare"]["breakdown_median_ms"]
    extra = {k: v - bare_ms.get(k, 0.0) for k, v in pma_ms.items()
             if k not in ("data", "fwd_bwd", "optimizer", "gc")}
    extra["loop_logging"] = side_stats["pma"]["breakdown_ms"]["loop_logging"]
    result["overhead_ms"] = extra
    bare_step = side_stats["bare"]["median_step_ms"]
    result["ratio_from_overhead"] = bare_step / (bare_step + sum(extra.values()))
    result["meets_target"] = result["ratio"] >= TARGET_RATIO
    b, p = result["bare"], result["pma"]
    print(f"[bench] {result['label']}: bare {b['tokens_per_s_median']:,.0f} tok/s "
          f"(median step {b['median_step_ms']:.2f} ms), "
          f"pma-train {p['tokens_per_s_median']:,.0f} tok/s (median step {p['median_step_ms']:.2f} ms): ratio "
          f"{result['ratio']:.3f} (all steps {result['ratio_mean']:.3f}; "
          f"per round median {result['ratio_rounds_median']:.3f}, "
          f"{min(pair_ratios):.3f}-{max(pair_ratios):.3f}); pma-train overhead {sum(extra.values()):.2f} ms/step "
          f"(ratio from it {result['ratio_from_overhead']:.3f}); "
          + (f"control (bare/bare) {result['control_ratio']:.3f}; " if result["control_ratio"] else "")
          + f"max loss diff {loss_diff:.2e}", flush=True)
    return result


# ----------------------------------------------------------------------------- reports

COMPONENTS = (  # (key, label) in the order of a step
    ("data", "data (next batch, to device)"),
    ("data_slowest_rank", "data on the slowest rank (what the step waits for)"),
    ("fwd_bwd", "forward + backward (incl. zero-grad, grad all-reduce)"),
    ("optimizer", "optimizer step + scheduler"),
    ("loss_reduce", "loss all-reduce (`reduce_lm_loss`)"),
    ("step_other", "rest of `train_step` (bookkeeping)"),
    ("loop_logging", "loop: metrics + logging (`Trainer.train`)"),
    ("gc", "of which: Python garbage collection (any of the above)"),
)


def write_reports(result: dict, directory: Path, fresh: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{BASENAME}.json"
    cases = {} if fresh or not path.exists() else {c["label"]: c for c in json.loads(path.read_text())["cases"]}
    cases[result["label"]] = result
    ordered = sorted(cases.values(), key=lambda c: (c["layout"]["world"], c["model"]["params_rank0"], c["label"]))
    path.write_text(json.dumps({"target_ratio": TARGET_RATIO, "cases": ordered}, indent=1) + "\n")
    (directory / f"{BASENAME}.md").write_text(markdown(ordered))
    plot(ordered, directory / f"{BASENAME}.png")


def markdown(cases: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Training throughput: pma-train vs a bare megatron-core loop",
        "",
        "Written by `benchmarks/train_throughput.py` (how to run: `benchmarks/README.md`). Both sides run in one",
        "process group on the same HybridModel, megatron-core DDP + distributed optimizer, LR schedule, batches",
        "and layout. After discarded warm-up steps, blocks of steps alternate (pma/bare, bare/pma, ...), so",
        "machine noise hits both alike. *tok/s* is tokens per step over the median step time; *ratio* is",
        f"pma-train over bare (target >= {TARGET_RATIO}). [p10-p90] is the spread of per-step tokens/s;",
        "*all steps* is the ratio of total tokens over total time (every slow step counts, ours or the",
        "machine's); *per round* is the median (min-max) of the ratio of each adjacent pair of blocks.",
        "*overhead* is what pma-train adds per step, measured directly: median ms of data on the slowest rank,",
        "of the loss all-reduce and of train-step bookkeeping, mean ms of loop logging, less the bare loop's data",
        "time (forward/backward and the optimizer run the same code on both sides); in brackets the ratio it",
        "implies at the bare median step, a figure machine noise barely moves. *loss diff*: largest per-step",
        "difference of the training loss between the sides (same weights and data). *control*:",
        "tokens/s of a second, identical bare loop over the first's, run in the same alternation: how far apart",
        "two identical loops measure on this machine, i.e. the resolution of *ratio*.",
        "",
        "| case | layout | OMP threads/rank | tokens/step | bare tok/s [p10-p90] | pma-train tok/s [p10-p90] "
        "| ratio | all steps | per round | overhead ms/step (ratio) | control | loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        b, p, lay = c["bare"], c["pma"], c["layout"]
        tokens_ms = c["batch"]["tokens_per_step"] * 1e3
        tps = lambda x: (f"{x['tokens_per_s_median']:,.0f} "  # noqa: E731
                         f"[{tokens_ms / x['p90_step_ms']:,.0f}-{tokens_ms / x['p10_step_ms']:,.0f}]")
        lines.append(
            f"| {c['label']} | world {lay['world']}: tp {lay['tp']} pp {lay['pp']} dp {lay['dp']} "
            f"| {c['env']['OMP_NUM_THREADS']} | {c['batch']['tokens_per_step']} | {tps(b)} | {tps(p)} "
            f"| **{c['ratio']:.3f}** | {c['ratio_mean']:.3f} "
            f"| {c['ratio_rounds_median']:.3f} ({min(c['ratio_rounds']):.3f}-{max(c['ratio_rounds']):.3f}) "
            f"| {sum(c['overhead_ms'].values()):.2f} ({c['ratio_from_overhead']:.3f}) "
            f"| {'-' if not c.get('control_ratio') else format(c['control_ratio'], '.3f')} "
            f"| {c['max_loss_diff']:.1e} |")
    for c in cases:
        m, bt, r, e = c["model"], c["batch"], c["run"], c["env"]
        lines += [
            "",
            f"## {c['label']}",
            "",
            f"Model `{m['name']}`: pattern `{m['pattern']}`, hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, "
            f"{m['num_attention_heads']} heads, {m['params_rank0'] / 1e6:.2f}M parameters on rank 0. "
            f"Batch: global {bt['global']}, micro {bt['micro']}, seq {bt['seq_len']} "
            f"({bt['microbatches_per_step']} micro-batches per step per rank). "
            f"{r['warmup']} warm-up + {r['rounds']} x {r['steps_per_block']} timed steps per side; "
            f"pma-train logs every {r['log_interval']} steps; bare batches {r['bare_data']}"
            + (f"; pma-train batches {r['pma_data']} (diagnostic)" if r.get("pma_data", "loader") != "loader" else "")
            + "."
            + (f" Overrides: `{' '.join(r['overrides'])}`." if r["overrides"] else ""),
            f"{e['device']}/{e['backend']}, {e['precision']}, OMP_NUM_THREADS={e['OMP_NUM_THREADS']} "
            f"({e['cpus']} CPUs), torch {e['torch']}, megatron-core {e['megatron_core']}, {e['date']}; "
            f"1-min load average {e['loadavg_1min_start_end'][0]} at the start, "
            f"{e['loadavg_1min_start_end'][1]} at the end.",
            "",
            "| per step, ms | bare mean | pma-train mean | bare median | pma-train median |",
            "|---|---|---|---|---|",
        ]
        b, p = c["bare"], c["pma"]
        for key, label in COMPONENTS:
            values = [b["breakdown_ms"].get(key), p["breakdown_ms"].get(key),
                      b["breakdown_median_ms"].get(key), p["breakdown_median_ms"].get(key)]
            if all(v is None for v in values):
                continue
            lines.append(f"| {label} | " + " | ".join(fmt(v) for v in values) + " |")
        lines.append(f"| **step** | **{b['mean_step_ms']:.3f}** | **{p['mean_step_ms']:.3f}** "
                     f"| **{b['median_step_ms']:.3f}** | **{p['median_step_ms']:.3f}** |")
    return "\n".join(lines) + "\n"


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 1.5 + 1.0 * max(3, len(cases))))
    ys = list(range(len(cases)))
    h = 0.38
    for offset, side, color, name in ((-h / 2, "bare", "#999999", "bare megatron-core"),
                                      (h / 2, "pma", "#1f77b4", "pma-train")):
        tokens = [c["batch"]["tokens_per_step"] * 1e3 for c in cases]
        vals = [c[side]["tokens_per_s_median"] for c in cases]
        lo = [v - t / c[side]["p90_step_ms"] for v, t, c in zip(vals, tokens, cases)]
        hi = [t / c[side]["p10_step_ms"] - v for v, t, c in zip(vals, tokens, cases)]
        left.barh([y + offset for y in ys], vals, height=h, color=color, label=name, xerr=[lo, hi], capsize=3)
    left.set_yticks(ys, [f"{c['label']}\nratio {c['ratio']:.3f}"
                         + (f"\n(control {c['control_ratio']:.3f})" if c.get("control_ratio") else "")
                         for c in cases], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("tokens/s at the median step (whiskers: p10-p90 of steps)")
    left.legend(fontsize=8)
    left.set_title(f"throughput (target ratio >= {TARGET_RATIO})")

    # Forward + backward is the same work on both sides and dwarfs the rest: show what is around it.
    # Medians (means carry the machine's noise), but the mean for logging, which runs every few steps.
    colors = {"data": "#8c564b", "optimizer": "#2ca02c", "loss_reduce": "#d62728",
              "step_other": "#9467bd", "loop_logging": "#ff7f0e"}
    rows, names = [], []
    for c in cases:
        for side, tag in (("bare", "bare"), ("pma", "pma-train")):
            logging_mean = c[side]["breakdown_ms"].get("loop_logging", 0.0)
            rows.append({**c[side]["breakdown_median_ms"], "loop_logging": logging_mean})
            names.append(f"{c['label']} {tag}")
    starts = [0.0] * len(rows)
    for key, label in COMPONENTS:
        if key not in colors:
            continue
        widths = [max(0.0, row.get(key, 0.0)) for row in rows]
        right.barh(range(len(rows)), widths, left=starts, color=colors[key], label=label.split(" (")[0])
        starts = [a + w for a, w in zip(starts, widths)]
    for y, (row, end) in enumerate(zip(rows, starts)):
        right.text(end, y, f"  + fwd/bwd {row['fwd_bwd']:.1f}", va="center", fontsize=7)
    right.set_xlim(0, max(starts) * 1.45)
    right.set_yticks(range(len(rows)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("ms per step outside forward + backward (medians; logging: mean)")
    right.legend(fontsize=7, loc="upper right")
    right.set_title("per-step breakdown")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if result is not None and not args.no_write:
        write_reports(result, args.results_dir, args.fresh)
        print(f"[bench] wrote {args.results_dir / BASENAME}.{{json,md,png}}", flush=True)
    from pma_train.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
