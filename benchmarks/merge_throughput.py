"""Throughput and memory of pma-merge (the sharded merge engine) on realistic megatron checkpoints.

Inputs: N torch_dist checkpoints of pma-train's own HybridModel, built with megatron-core at TP=2
under torchrun (2 ranks), fp32, weights perturbed between saves, model only (no optimizer), saved
with `pma_train.checkpoint.state.save_checkpoint` into `<root>/iter_XXXXXXX` with the pma_train.json
sidecar, so the merges select them by tokens (`n=N v_tokens=V`). Default: ~56M parameters
(hidden 768, 4 blocks, vocabulary padded to 20096), 224 MB per checkpoint, N = 10 -> 2.2 GB (2.09 GiB).
They are generated once into the work directory and reused while their config matches.

Measured in one run, page cache warm (every input file is read once before each phase):
- raw read: every .distcp file read with large sequential preadv calls into one reused buffer;
- the engine (`run_merge`, in-process under torchrun): GB/s of input for 1 and 2 merge ranks at
  memory_budget_mb 256 and a smaller budget, N = 2, 5, 10, per-rank peak RSS and its growth during the
  merge (the engine's own sampling); rounds alternate 1-rank and 2-rank jobs so machine noise hits both;
- the whole command (`torchrun ... -m pma_train.cli.merge`, and plain `pma-merge` on one rank):
  wall time including torchrun, interpreter start and imports, and the Python import time alone;
- a naive baseline in one process: `dcp_to_torch_save` per input + `torch.load` + weighted sum (+
  `torch.save` of the result), with its time split and its peak RSS (psutil sampling + ru_maxrss);
- where the engine's time goes: a 1-rank merge with timers around the engine's own functions
  (exclusive times: preadv, read-buffer allocation, archive indexing, isfinite check, add_, dtype
  conversion, accumulator allocation, torch.save of the output, fsync, per-piece Python), per-GB
  costs of the primitive operations, and (if py-spy is installed) a sampled profile.

    python benchmarks/merge_throughput.py            # full run (~5-10 min on 2 cores)
    python benchmarks/merge_throughput.py --quick    # small model, N=4, 1 round (smoke test, ~2-3 min)

Results: benchmarks/results/merge_throughput.{md,json,png} (`--quick`: merge_throughput_quick.*).
Every process runs with OMP_NUM_THREADS=1 (torchrun's default for 2 ranks; see the report for why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import merge_startup  # this directory: the lean path's start-up and memory figures

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASENAME = "merge_throughput"
TARGET_GBPS = 3.0
GB = 1e9
MiB = 2**20
GiB = 2**30

# ~56M parameters in fp32: 224 MB per checkpoint, 10 checkpoints = 2.24 GB (>= 2 GiB).
FULL_MODEL = dict(num_layers=4, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=12, num_query_groups=4,
                  vocab_size=20000, make_vocab_size_divisible_by=128)
QUICK_MODEL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=2,
                   vocab_size=4000, make_vocab_size_divisible_by=128)
ITER_STEP = 100  # checkpoints at iterations 100, 200, ...
GLOBAL_BATCH, SEQ_LEN = 64, 1024  # recorded in the sidecars: tokens = iteration * 64 * 1024
V_TOKENS = ITER_STEP * GLOBAL_BATCH * SEQ_LEN


def _env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR",
                "WANDB_MODE": "disabled"})
    return env


def _torchrun(nproc: int) -> list[str]:
    from pma_train.slurm_env import free_port  # as this file's other pma_train imports: not at module load

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]


def _run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc, wall


def _median(values):
    return statistics.median(values) if values else None


# ============================================================================= workers (subprocesses)


def worker_generate(argv: list[str]) -> None:
    """torchrun, 2 ranks: build the HybridModel at TP=2 and save N perturbed model-only checkpoints."""
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--model", required=True, help="JSON of model fields")
    a = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    from pma_train import platform as platform_mod
    from pma_train.checkpoint.state import TrainState, save_checkpoint
    from pma_train.config import JobConfig
    from pma_train.model import build_model
    from pma_train.parallel import destroy_distributed, init_distributed

    model = json.loads(a.model)
    vocab = model.pop("vocab_size")
    cfg = JobConfig()
    cfg.model.name = "merge-bench"
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.parallel.tp = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.train.seq_length = SEQ_LEN
    platform = platform_mod.detect(None)
    init_distributed(cfg.parallel, platform, cfg.seed)
    rank = dist.get_rank()
    start = time.perf_counter()
    chunks = build_model(cfg, platform, vocab)
    build_s = time.perf_counter() - start
    params = torch.tensor([sum(p.numel() for c in chunks for p in c.parameters())])
    dist.all_reduce(params)
    generator = torch.Generator().manual_seed(1000 + rank)
    saves = []
    for i in range(a.count):
        with torch.no_grad():  # a training step's worth of change, different on every TP rank
            for param in chunks[0].parameters():
                param.add_(torch.randn(param.shape, generator=generator), alpha=1e-3)
        iteration = ITER_STEP * (i + 1)
        start = time.perf_counter()
        save_checkpoint(a.root, chunks, None, None,
                        TrainState(iteration=iteration, consumed_samples=iteration * GLOBAL_BATCH,
                                   consumed_tokens=iteration * GLOBAL_BATCH * SEQ_LEN))
        saves.append(time.perf_counter() - start)
    if rank == 0:
        print("GENERATE " + json.dumps({"params": int(params.item()), "build_s": build_s, "save_s": saves}), flush=True)
    destroy_distributed()


class RssSampler:
    """Peak RSS of this process, sampled in a thread (like the engine's own sampler)."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def worker_engine(argv: list[str]) -> None:
    """torchrun, any ranks: run_merge in-process for each config; rank 0 prints the summaries."""
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", required=True, help='JSON list of {"n":..,"budget_mb":..}')
    a = p.parse_args(argv)
    from dataclasses import asdict

    import torch.distributed as dist

    from pma_train.merge import select_spaced, sma
    from pma_train.merge.engine import MergeRequest, run_merge
    from pma_train.parallel import init_process_group

    init_process_group("gloo")
    rank = dist.get_rank()
    rows = []
    for i, config in enumerate(json.loads(a.configs)):
        n, budget = config["n"], config["budget_mb"]
        out = Path(a.out) / f"cfg{i}"
        inputs = select_spaced(a.root, n, v_tokens=V_TOKENS)
        request = MergeRequest(inputs=inputs, weights=sma(n), output_root=out, method="sma",
                               budget_bytes=budget * MiB, progress=False, overwrite=True)
        dist.barrier()
        start = time.perf_counter()
        summary = run_merge(request)
        call_s = time.perf_counter() - start
        if rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        dist.barrier()
        rows.append({**config, "call_s": call_s, "threads": int(os.environ.get("OMP_NUM_THREADS", "0")),
                     **asdict(summary)})
    if rank == 0:
        print("ENGINE " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def worker_naive(argv: list[str]) -> None:
    """One process: dcp_to_torch_save each input, torch.load it, keep all, weighted sum, torch.save."""
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--scratch", required=True)
    a = p.parse_args(argv)
    import resource

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from pma_train.merge import select_spaced, sma

    inputs = select_spaced(a.root, a.count, v_tokens=V_TOKENS)
    weights = sma(a.count)
    scratch = Path(a.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    times = {"dcp_to_torch_save": 0.0, "torch_load": 0.0, "average": 0.0, "torch_save_output": 0.0}
    with RssSampler() as rss:
        start = time.perf_counter()
        states = []
        for info in inputs:
            tmp = scratch / "input.pt"
            t = time.perf_counter()
            dcp_to_torch_save(str(info.path), str(tmp))
            times["dcp_to_torch_save"] += time.perf_counter() - t
            t = time.perf_counter()
            state = torch.load(tmp, map_location="cpu", weights_only=False)
            times["torch_load"] += time.perf_counter() - t
            tmp.unlink()
            states.append({k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
            del state
        t = time.perf_counter()
        merged = {}
        for key in states[-1]:
            acc = torch.zeros(states[-1][key].shape, dtype=torch.float32)
            for w, state in zip(weights, states):
                acc.add_(state[key].float(), alpha=w)
            merged[key] = acc.to(states[-1][key].dtype)
        times["average"] = time.perf_counter() - t
        t = time.perf_counter()
        torch.save(merged, scratch / "merged.pt")
        times["torch_save_output"] = time.perf_counter() - t
        total = time.perf_counter() - start
    (scratch / "merged.pt").unlink()
    input_bytes = sum(f.stat().st_size for info in inputs for f in info.path.glob("*.distcp"))
    print("NAIVE " + json.dumps({
        "n": a.count, "seconds": total, "times": times, "input_bytes": input_bytes,
        "tensor_bytes": sum(t.numel() * t.element_size() for s in states for t in s.values()),
        "peak_rss": rss.peak, "rss_start": rss.start, "rss_growth": rss.peak - rss.start,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


class _Timers:
    """Exclusive wall time per label for nested wrapped calls (a child's time leaves its parent)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[float] = []

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                child = self.stack.pop()
                self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - child
                self.calls[label] = self.calls.get(label, 0) + 1
                if self.stack:
                    self.stack[-1] += elapsed

        timed.__wrapped__ = fn
        return timed


PROFILE_LABELS = {
    "preadv": "preadv (copy from page cache; faults in fresh buffer pages)",
    "alloc": "read-buffer allocation (torch.empty / bytearray)",
    "locate": "archive indexing (zip directory + unpickle, once per chunk)",
    "check": "isfinite check (torch.isfinite + .all)",
    "add": "add_ (weighted accumulate)",
    "to": "dtype conversion (.to)",
    "zeros": "accumulator allocation (torch.zeros / zeros_like)",
    "save": "torch.save of the output piece (pickle + zip + crc32 + write)",
    "close": "flush + fsync of the output file",
    "python": "per-piece Python (slicing, intersect, loop) + freeing tensors",
}


def worker_profile(argv: list[str]) -> None:
    """One process, a world of 1: a merge with timers around the engine's functions, then primitive costs."""
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--budget-mb", type=int, default=256)
    p.add_argument("--plain", action="store_true", help="no timers (for py-spy)")
    a = p.parse_args(argv)
    import torch

    from pma_train.merge import dcp_io, engine, select_spaced, sma
    from pma_train.merge.engine import MergeRequest, run_merge
    from pma_train.parallel import init_process_group

    init_process_group("gloo")
    inputs = select_spaced(a.root, a.count, v_tokens=V_TOKENS)
    request = MergeRequest(inputs=inputs, weights=sma(a.count), output_root=Path(a.out), method="sma",
                           budget_bytes=a.budget_mb * MiB, progress=False, overwrite=True)
    timers = _Timers()
    restore = []

    def patch(owner, name, label):
        original = getattr(owner, name)
        restore.append((owner, name, original))
        setattr(owner, name, timers.wrap(original, label))

    if not a.plain:
        class _Os:  # dcp_io's `os`, with preadv timed
            def __getattr__(self, name):
                return getattr(os, name)

        proxy = _Os()
        proxy.preadv = timers.wrap(os.preadv, "preadv")
        restore.append((dcp_io, "os", os))
        dcp_io.os = proxy
        # Timed at the torch / os level, so the breakdown holds while the engine's code moves.
        dcp_io.bytearray = timers.wrap(bytearray, "alloc")  # a module global shadows the builtin
        restore.append((dcp_io, "bytearray", bytearray))
        for owner, name, label in (
                (torch, "empty", "alloc"), (dcp_io.ChunkReader, "_locate", "locate"),
                (dcp_io.ChunkReader, "read_rows", "python"), (dcp_io.ChunkReader, "_pread_tensor", "python"),
                (engine, "_check_finite", "check"), (torch, "isfinite", "check"), (torch.Tensor, "all", "check"),
                (engine, "_accumulate", "python"), (engine, "_merge_piece", "python"),
                (torch.Tensor, "add_", "add"), (torch.Tensor, "to", "to"), (torch, "zeros", "zeros"),
                (torch, "zeros_like", "zeros"), (dcp_io.ChunkWriter, "write_tensor", "save"), (torch, "save", "save"),
                (dcp_io.ChunkWriter, "close", "close")):
            if hasattr(owner, name):
                patch(owner, name, label)
    start = time.perf_counter()
    summary = run_merge(request)
    call_s = time.perf_counter() - start
    for owner, name, original in reversed(restore):
        if owner is dcp_io and name == "bytearray":
            del dcp_io.bytearray
        else:
            setattr(owner, name, original)
    shutil.rmtree(a.out, ignore_errors=True)
    # _finish (rank 0, after the timed loop) also calls close/to/write: only the loop's share counts.
    result = {"n": a.count, "budget_mb": a.budget_mb, "seconds": summary.seconds, "call_s": call_s,
              "bytes_read": summary.bytes_read, "bytes_written": summary.bytes_written, "pieces": summary.pieces,
              "read_gbps": summary.read_gbps, "timers": timers.seconds, "calls": timers.calls}
    if not a.plain:
        result["primitives"] = primitive_costs([f for info in inputs for f in sorted(info.path.glob("*.distcp"))],
                                               Path(a.out).parent)
    print("PROFILE " + json.dumps(result), flush=True)


def primitive_costs(files: list[Path], scratch: Path, mb: int = 64) -> dict:
    """GB/s of the operations the engine performs, on one 64 MB fp32 block, 1 thread (median of 5)."""
    import torch

    numel = mb * MiB // 4
    x = torch.randn(numel)
    acc = torch.zeros(numel)
    reused = torch.empty(numel * 4, dtype=torch.uint8)
    fd = os.open(files[0], os.O_RDONLY)
    size = min(numel * 4, os.fstat(fd).st_size)

    def preadv_fresh():
        buf = bytearray(size)
        os.preadv(fd, [buf], 0)
        return torch.frombuffer(buf, dtype=torch.uint8)

    def preadv_reused():
        os.preadv(fd, [memoryview(reused.numpy())[:size]], 0)

    def save(crc):
        def run():
            torch.serialization.set_crc32_options(crc)
            try:
                with open(scratch / "primitive.pt", "wb") as f:
                    torch.save(x, f)
            finally:
                torch.serialization.set_crc32_options(True)
        return run

    def fsync():
        with open(scratch / "primitive.bin", "wb") as f:
            f.write(memoryview(x.numpy()))
            f.flush()
            start = time.perf_counter()
            os.fsync(f.fileno())
            return time.perf_counter() - start

    ops = {
        "preadv into a fresh bytearray (engine's read)": (preadv_fresh, size),
        "preadv into a reused buffer": (preadv_reused, size),
        "torch.isfinite(x).all() (engine's check)": (lambda: torch.isfinite(x).all(), x.nbytes),
        "torch.isfinite(x.sum()) (screen)": (lambda: torch.isfinite(x.sum()), x.nbytes),
        "torch.isnan(x).any()": (lambda: torch.isnan(x).any(), x.nbytes),
        "acc.add_(x, alpha=w)": (lambda: acc.add_(x, alpha=0.1), x.nbytes),
        "torch.mul(x, w, out=acc)": (lambda: torch.mul(x, 0.1, out=acc), x.nbytes),
        "torch.zeros (fresh accumulator)": (lambda: torch.zeros(numel), x.nbytes),
        "torch.save (crc32 on, default)": (save(True), x.nbytes),
        "torch.save (crc32 off)": (save(False), x.nbytes),
    }
    out = {}
    threads = torch.get_num_threads()
    for name, (fn, nbytes) in ops.items():
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"gbps": nbytes / statistics.median(times) / GB, "ms_per_64MB": statistics.median(times) * 1e3}
    times = sorted(fsync() for _ in range(3))
    out["fsync of 64 MB just written"] = {"gbps": x.nbytes / times[1] / GB, "ms_per_64MB": times[1] * 1e3}
    os.close(fd)
    for name in ("primitive.pt", "primitive.bin"):
        (scratch / name).unlink(missing_ok=True)
    return {"threads": threads, "block_mb": mb, "ops": out}


def worker_imports(argv: list[str]) -> None:
    start = time.perf_counter()
    import pma_train.cli.merge  # noqa: F401  (hydra, omegaconf, pma_train.config)
    cli = time.perf_counter() - start
    import pma_train.merge.engine  # noqa: F401  (torch, torch.distributed.checkpoint)
    print("IMPORTS " + json.dumps({"cli_s": cli, "engine_s": time.perf_counter() - start - cli}), flush=True)


def worker_noop(argv: list[str]) -> None:
    """What every merge rank does besides merging: import the engine, join the gloo group, leave."""
    import torch.distributed as dist

    import pma_train.merge.engine  # noqa: F401
    from pma_train.parallel import init_process_group

    init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


WORKERS = {"_noop": worker_noop, "_generate": worker_generate, "_engine": worker_engine, "_naive": worker_naive,
           "_profile": worker_profile, "_imports": worker_imports}


def _parse(proc: subprocess.CompletedProcess, tag: str):
    for line in proc.stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise RuntimeError(f"no {tag} line in the output:\n{(proc.stdout + proc.stderr)[-3000:]}")


# ============================================================================= the driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, N=4 (sweep 2,4), 1 round, no py-spy: a smoke test")
    p.add_argument("--n", type=int, default=10, help="checkpoints merged in the headline figures")
    p.add_argument("--sweep-n", default="2,5,10", help="N values for the peak-RSS sweep")
    p.add_argument("--budgets", default="256,64,16", help="memory_budget_mb values (the first is the headline)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (engine 1 rank, engine 2 ranks, the two CLI commands)")
    p.add_argument("--work-dir", default="/tmp/pma-merge-bench", help="checkpoints and outputs (GBs)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the generated inputs for a later run")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--py-spy", default="auto", choices=("auto", "off"), help="sampled profile if py-spy is installed")
    p.add_argument("--render", metavar="JSON", help="only re-render the .md and .png next to an existing results .json")
    a = p.parse_args(argv)
    if a.quick:  # 4 small checkpoints, one round, no 2-thread job, naive at N only, no py-spy
        a.rounds, a.n, a.sweep_n, a.py_spy = min(a.rounds, 1), min(a.n, 4), "2,4", "off"
    a.sweep = sorted({int(x) for x in a.sweep_n.split(",")} | {a.n})
    a.budget_list = [int(x) for x in a.budgets.split(",")]
    return a


def machine_info(work: Path) -> dict:
    import psutil
    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True, text=True).stdout.strip()
    try:
        import megatron.core

        megatron_version = megatron.core.__version__
    except Exception:
        megatron_version = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
            "kernel": host_platform.release(), "python": host_platform.python_version(), "torch": torch.__version__,
            "megatron_core": megatron_version, "work_dir": str(work), "filesystem": fs or "?"}


def checkpoint_files(root: Path, n: int) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.name.startswith("iter_"))[-n:]
    return [f for d in dirs for f in sorted(d.glob("*.distcp"))]


def read_all(files: list[Path], block: int = 16 * MiB) -> tuple[int, float]:
    """Every file with large sequential preadv calls into one reused buffer: (bytes, seconds)."""
    buffer = bytearray(block)
    view = memoryview(buffer)
    total, start = 0, time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(fd, [view], offset)
                if got == 0:
                    break
                offset += got
            total += offset
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


def ensure_checkpoints(args, work: Path, log) -> tuple[Path, dict]:
    model = QUICK_MODEL if args.quick else FULL_MODEL
    n = max(args.sweep)
    spec = {"model": model, "n": n, "tp": 2, "iter_step": ITER_STEP, "global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN,
            "version": 1}
    root = work / ("ckpts-quick" if args.quick else "ckpts")
    marker = root / "merge_bench.json"
    if marker.is_file() and json.loads(marker.read_text()).get("spec") == spec:
        log(f"reusing the checkpoints in {root}")
        return root, json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    log(f"generating {n} checkpoints (TP=2, 2 ranks) into {root} ...")
    proc, wall = _run(_torchrun(2) + [__file__, "_generate", "--root", str(root), "--count", str(n),
                                      "--model", json.dumps(model)])
    info = {"spec": spec, **_parse(proc, "GENERATE"), "wall_s": wall}
    marker.write_text(json.dumps(info, indent=1))
    return root, info


def run_benchmark(args) -> dict:
    work = Path(args.work_dir) / f"run-{os.getpid()}"
    try:
        return _run_benchmark(args, work)
    finally:  # outputs and scratch always go; the inputs unless --keep-checkpoints (see below)
        shutil.rmtree(work, ignore_errors=True)


def _run_benchmark(args, work: Path) -> dict:
    base = Path(args.work_dir)
    base.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {message}", flush=True)

    load_start = os.getloadavg()
    result = {"quick": args.quick, "machine": machine_info(base), "target_gbps": TARGET_GBPS,
              "conditions": {"threads_per_process": 1, "page_cache": "warm (all inputs read once before each phase)",
                             "loadavg_start": [round(x, 2) for x in load_start]}}
    root, generated = ensure_checkpoints(args, base, log)
    files = checkpoint_files(root, args.n)
    input_bytes = sum(f.stat().st_size for f in files)
    free = shutil.disk_usage(base).free
    result["inputs"] = {
        "root": str(root), "model": generated["spec"]["model"], "tp": 2, "dtype": "fp32", "params": generated["params"],
        "n": args.n, "bytes_per_checkpoint": input_bytes // args.n, "bytes_total": input_bytes,
        "files_per_checkpoint": len(files) // args.n, "v_tokens": V_TOKENS,
        "generate": {k: generated[k] for k in ("build_s", "save_s", "wall_s") if k in generated}}
    log(f"inputs: N={args.n}, {input_bytes / GiB:.2f} GiB ({input_bytes / GB:.2f} GB), "
        f"{generated['params'] / 1e6:.1f}M params; {free / GiB:.0f} GiB free")

    def warm():
        read_all(checkpoint_files(root, max(args.sweep)))

    # ---- raw read
    warm()
    raw = [read_all(files)[1] for _ in range(3)]
    result["raw_read"] = {"seconds": raw, "gbps_median": input_bytes / _median(raw) / GB, "block_mib": 16}
    log(f"raw read: {result['raw_read']['gbps_median']:.2f} GB/s (median of 3, warm cache)")

    # ---- engine (in-process, alternating 1 and 2 ranks) and the CLI, per round
    engine_runs, cli_runs = [], []
    out = work / "out"

    def engine_job(ranks, threads, cfgs, tag):
        warm()
        proc, wall = _run(_torchrun(ranks) + [__file__, "_engine", "--root", str(root), "--out", str(out),
                                              "--configs", json.dumps(cfgs)], env=_env(threads))
        rows = [{**tag, "ranks": ranks, "job_wall_s": wall, **row} for row in _parse(proc, "ENGINE")]
        engine_runs.extend(rows)
        return rows

    headline = [{"n": args.n, "budget_mb": b} for b in args.budget_list]
    for round_ in range(args.rounds):
        # Budgets in alternating order (the second merge of a job finds a warmer heap). A 1-rank job
        # with 2 OpenMP threads (what plain `pma-merge` gets on 2 cores) once, at the headline config.
        order = headline if round_ % 2 == 0 else headline[::-1]
        jobs = [(1, 1, order), (2, 1, order)] + ([(1, 2, headline[:1])] if round_ == 0 and not args.quick else [])
        for ranks, threads, cfgs in jobs:
            rows = engine_job(ranks, threads, cfgs, {"phase": "rounds", "round": round_})
            first = next(r for r in rows if r["budget_mb"] == args.budget_list[0])
            log(f"round {round_ + 1}/{args.rounds}: engine {ranks} rank(s) x {threads} thread(s), N={args.n}: "
                f"{first['read_gbps']:.2f} GB/s ({first['seconds']:.2f} s; job {first['job_wall_s']:.1f} s)")
        for label, cmd, shown in cli_commands(root, out, args):
            warm()
            proc, wall = _run(cmd)
            merged = json.loads(next(out.glob("iter_*/pma_merge.json")).read_text())["summary"]
            line = next((x for x in proc.stdout.splitlines() if x.startswith("merged ")), "")
            cli_runs.append({"round": round_, "label": label, "command": shown, "wall_s": wall, "summary": merged,
                             "stdout_line": line})
            shutil.rmtree(out, ignore_errors=True)
            log(f"round {round_ + 1}/{args.rounds}: {label}: wall {wall:.1f} s, engine {merged['seconds']:.2f} s "
                f"({merged['read_gbps']:.2f} GB/s)")
    # ---- peak RSS vs N: one fresh 2-rank job per (budget, N), so no merge inherits another's heap
    for budget in (args.budget_list[:1] if args.quick else args.budget_list):
        for n in args.sweep:
            row = engine_job(2, 1, [{"n": n, "budget_mb": budget}], {"phase": "rss"})[0]
            log(f"RSS sweep, 2 ranks, budget {budget} MiB, N={n}: growth per rank "
                f"{[round(r['rss_growth'] / MiB) for r in row['per_rank']]} MiB, {row['read_gbps']:.2f} GB/s")
    result["engine_runs"], result["cli_runs"] = engine_runs, cli_runs
    proc, _ = _run([sys.executable, __file__, "_imports"])
    imports = [_parse(proc, "IMPORTS")]
    proc, interp = _run([sys.executable, "-c", "pass"])
    _, noop = _run(_torchrun(2) + [__file__, "_noop"])
    plain = cli_commands(root, out, args)[1][1]
    result["lean"] = merge_startup.measure(_run, _torchrun(2), plain[:-len(merge_args(root, out, args))],
                                           merge_args(root, out, args), out)
    result["startup"] = {"imports": imports[0], "bare_interpreter_s": interp, "torchrun_2_noop_s": noop,
                         "pma_merge_dry_run_s": result["lean"]["dry_run_s_median"]}

    # ---- naive baseline
    if not args.no_naive:
        naive = []
        for n in ([args.n] if args.quick else args.sweep):
            warm()
            proc, wall = _run([sys.executable, __file__, "_naive", "--root", str(root), "--count", str(n),
                               "--scratch", str(work / "naive")])
            row = _parse(proc, "NAIVE")
            row["wall_s"] = wall
            naive.append(row)
            log(f"naive N={n}: {row['seconds']:.1f} s, peak RSS {row['peak_rss'] / MiB:.0f} MiB")
        result["naive"] = naive

    # ---- profile
    if not args.no_profile:
        warm()
        proc, _ = _run([sys.executable, __file__, "_profile", "--root", str(root), "--out", str(work / "prof"),
                        "--count", str(args.n), "--budget-mb", str(args.budget_list[0])])
        result["profile"] = _parse(proc, "PROFILE")
        log(f"profile: {result['profile']['read_gbps']:.2f} GB/s with timers")
        spy = shutil.which("py-spy") or (str(Path(sys.executable).parent / "py-spy")
                                         if (Path(sys.executable).parent / "py-spy").exists() else None)
        if args.py_spy == "auto" and spy:
            warm()
            raw_out = work / "py-spy.txt"
            proc, _ = _run([spy, "record", "-r", "100", "-n", "-f", "raw", "-o", str(raw_out), "--", sys.executable,
                            __file__, "_profile", "--plain", "--root", str(root), "--out", str(work / "prof"),
                            "--count", str(args.n), "--budget-mb", str(args.budget_list[0])])
            result["py_spy"] = {**summarise_py_spy(raw_out), "plain_run": _parse(proc, "PROFILE")}
            log("py-spy profile done")
    result["conditions"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_benchmark_s"] = time.perf_counter() - t_start
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep_checkpoints:
        shutil.rmtree(root, ignore_errors=True)
    return result


def merge_args(root: Path, out: Path, args) -> list[str]:
    return ["progress_bar=false", f"root={root}", f"n={args.n}", f"v_tokens={V_TOKENS}", "method=sma",
            f"memory_budget_mb={args.budget_list[0]}", f"output={out}"]


def cli_commands(root: Path, out: Path, args) -> list[tuple[str, list[str], str]]:
    """(label, argv, how it reads in the report) of the whole-command runs."""
    common = merge_args(root, out, args)
    shown = " ".join(common).replace(str(root), "<root>").replace(str(out), "<out>")
    pma_merge = Path(sys.executable).parent / "pma-merge"
    plain = [str(pma_merge)] if pma_merge.exists() else [sys.executable, "-m", "pma_train.cli.merge"]
    return [("torchrun 2 ranks", _torchrun(2) + ["-m", "pma_train.cli.merge"] + common,
             f"OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m pma_train.cli.merge {shown}"),
            ("pma-merge 1 rank (no torchrun)", plain + common, f"OMP_NUM_THREADS=1 pma-merge {shown}")]


def summarise_py_spy(path: Path, top: int = 14) -> dict:
    """Samples inside run_merge, by the innermost engine / dcp_io / torch.serialization frame + native leaf."""
    by_frame: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "run_merge" not in stack or not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        python = [i for i, f in enumerate(frames) if "pma_train/merge" in f or "serialization.py" in f]
        key = frames[python[-1]] if python else frames[-1]
        native = [f for f in frames[(python[-1] + 1) if python else len(frames):] if ".py" not in f]
        if native:
            key += " -> " + native[min(1, len(native) - 1)].split(" (")[0][:60]
        by_frame[key] = by_frame.get(key, 0) + int(count)
    rows = sorted(by_frame.items(), key=lambda kv: -kv[1])[:top]
    return {"samples": total, "rate_hz": 100, "top": [{"frame": k, "samples": v, "share": v / max(total, 1)} for k, v in rows]}


# ============================================================================= reports


def aggregate(result: dict) -> dict:
    """Medians over rounds per (ranks, threads, n, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for row in result["engine_runs"]:
        groups.setdefault((row["phase"], row["ranks"], row["threads"], row["n"], row["budget_mb"]), []).append(row)
    table = []
    for (phase, ranks, threads, n, budget), rows in sorted(groups.items()):
        gbps = [r["read_gbps"] for r in rows]
        per_rank_growth = [max(r["per_rank"][k]["rss_growth"] for r in rows) for k in range(ranks)]
        per_rank_peak = [max(r["per_rank"][k]["peak_rss"] for r in rows) for k in range(ranks)]
        table.append({"phase": phase, "ranks": ranks, "threads": threads, "n": n, "budget_mb": budget, "runs": len(rows),
                      "bytes_read": rows[0]["bytes_read"], "pieces": rows[0]["pieces"],
                      "seconds_median": _median([r["seconds"] for r in rows]),
                      "gbps_median": _median(gbps), "gbps_min": min(gbps), "gbps_max": max(gbps),
                      "peak_rss_max": max(r["peak_rss_bytes"] for r in rows),
                      "growth_max": max(r["peak_rss_above_start_bytes"] for r in rows),
                      "per_rank_peak_rss": per_rank_peak, "per_rank_growth": per_rank_growth})
    cli: dict[str, list[dict]] = {}
    for row in result["cli_runs"]:
        cli.setdefault(row["label"], []).append(row)
    cli_table = [{"label": label, "command": rows[0]["command"], "runs": len(rows),
                  "wall_median": _median([r["wall_s"] for r in rows]),
                  "engine_median": _median([r["summary"]["seconds"] for r in rows]),
                  "gbps_median": _median([r["summary"]["read_gbps"] for r in rows]),
                  "peak_rss_max": max(r["summary"]["peak_rss_bytes"] for r in rows),
                  "growth_max": max(r["summary"]["peak_rss_above_start_bytes"] for r in rows)} for label, rows in cli.items()]
    return {"engine": [r for r in table if r["phase"] == "rounds"], "rss": [r for r in table if r["phase"] == "rss"],
            "cli": cli_table}


def _find(table, **match):
    return next((row for row in table if all(row[k] == v for k, v in match.items())), None)


def profile_rows(profile: dict) -> list[tuple[str, float]]:
    timers = profile["timers"]
    rows = [(PROFILE_LABELS[k], timers.get(k, 0.0)) for k in PROFILE_LABELS]
    accounted = sum(s for _, s in rows)
    rows.append(("rest of the timed loop (progress, RSS sampler, GIL, unwrapped)", max(0.0, profile["seconds"] - accounted)))
    return rows


def markdown(result: dict, agg: dict) -> str:
    inp, m, cond = result["inputs"], result["machine"], result["conditions"]
    n, budgets = inp["n"], sorted({r["budget_mb"] for r in agg["engine"]}, reverse=True)
    head = budgets[0] if 256 not in budgets else 256
    e2 = _find(agg["engine"], ranks=2, threads=1, n=n, budget_mb=head)
    e1 = _find(agg["engine"], ranks=1, threads=1, n=n, budget_mb=head)
    cli2 = _find(agg["cli"], label="torchrun 2 ranks")
    fmt_g = lambda row: "-" if row is None else f"{row['gbps_median']:.2f} GB/s"  # noqa: E731
    lines = [f"# pma-merge throughput and memory{' (quick run)' if result['quick'] else ''}", "",
             "Written by `benchmarks/merge_throughput.py`" + (" --quick" if result["quick"] else "") +
             ". GB = 1e9 bytes (throughput), MiB/GiB = 2^20/2^30 bytes (sizes, RSS).", "",
             "## Machine and conditions", "",
             f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; work dir {m['work_dir']} "
             f"({m['filesystem']}); Python {m['python']}, torch {m['torch']}, megatron-core {m['megatron_core']}.",
             f"- Page cache **warm**: every input file is read once before each phase (raw read, every engine job, "
             f"every CLI run, each naive run, the profile). One OpenMP thread per process unless stated.",
             f"- Load average (1/5/15 min) at start {cond['loadavg_start']}, at end {cond.get('loadavg_end')}: the machine "
             f"is shared, so other jobs took CPU during the run; figures are medians over {max(r['runs'] for r in agg['engine'])} "
             f"round(s) that alternate 1-rank and 2-rank jobs.",
             f"- Whole benchmark: {result['total_benchmark_s']:.0f} s.", "",
             "## Inputs", "",
             f"- {inp['n']} checkpoints of pma-train's HybridModel ({inp['params'] / 1e6:.1f}M parameters, fp32; "
             f"hidden {inp['model']['hidden_size']}, {inp['model']['num_layers']} blocks, ffn {inp['model']['ffn_hidden_size']}, "
             f"vocabulary {inp['model']['vocab_size']} padded to a multiple of {inp['model']['make_vocab_size_divisible_by']}), "
             f"saved by megatron-core dist_checkpointing (torch_dist) at TP=2 from 2 ranks, model only, weights perturbed "
             f"between saves, {inp['files_per_checkpoint']} .distcp files each; selected by tokens (`n={inp['n']} "
             f"v_tokens={inp['v_tokens']}`).",
             f"- {inp['bytes_per_checkpoint'] / MiB:.0f} MiB per checkpoint, **{inp['bytes_total'] / GiB:.2f} GiB "
             f"({inp['bytes_total'] / GB:.2f} GB) in all** (the .distcp files).", "",
             "## Headline", "",
             "| figure | value | target |", "|---|---|---|",
             f"| engine throughput, 2 ranks, N={n}, budget {head} MiB (GB of input / engine seconds) | {fmt_g(e2)} "
             f"({e2['gbps_min']:.2f}-{e2['gbps_max']:.2f}) | >= {TARGET_GBPS} GB/s |" if e2 else "| engine 2 ranks | - | |",
             f"| engine throughput, 1 rank | {fmt_g(e1)} ({e1['gbps_min']:.2f}-{e1['gbps_max']:.2f}) | |" if e1 else "| engine 1 rank | - | |",
             f"| raw read of the same files (16 MiB preadv, reused buffer, 1 process) | "
             f"{result['raw_read']['gbps_median']:.2f} GB/s | |"]
    if cli2:
        lines.append(f"| whole command `torchrun --nproc-per-node 2 -m pma_train.cli.merge ...` wall time | "
                     f"{cli2['wall_median']:.1f} s (engine {cli2['engine_median']:.2f} s) | |")
    for b in budgets:
        r = _find(agg["rss"], ranks=2, threads=1, n=n, budget_mb=b)
        if r:
            lines.append(f"| RSS growth while merging, busiest of 2 ranks, N={n}, budget {b} MiB (fresh job) | "
                         f"{r['growth_max'] / MiB:.0f} MiB (whole process {r['peak_rss_max'] / MiB:.0f} MiB) | <= {b} MiB |")
    naive = {r["n"]: r for r in result.get("naive", [])}
    if n in naive:
        lines.append(f"| naive load-everything baseline, N={n} | {naive[n]['seconds']:.1f} s, peak RSS "
                     f"{naive[n]['peak_rss'] / MiB:.0f} MiB | |")
    lines += ["", "## Engine: 1 vs 2 merge ranks, memory budgets, N", "",
              "In-process `run_merge` under torchrun (one job per row group and round; outputs deleted after each merge). "
              "*GB/s* = bytes read / the engine's timed loop (`summary.seconds`: read, accumulate, write, fsync; not "
              "planning or publishing), median (min-max) over rounds. RSS: the engine's own sampler, max over rounds; "
              "*growth* = peak minus RSS at the start of the merge (here the second merge of a job may reuse heap the "
              "first one freed: see the fresh-job sweep below for memory).", "",
              "| ranks x threads | N | budget MiB | GiB read | pieces | engine s | GB/s | busiest rank: peak RSS / growth MiB | per-rank growth MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(agg["engine"], key=lambda r: (r["n"] != n, r["budget_mb"] != head, r["ranks"], r["threads"], r["n"], -r["budget_mb"])):
        lines.append(f"| {row['ranks']} x {row['threads']} | {row['n']} | {row['budget_mb']} | {row['bytes_read'] / GiB:.2f} | "
                     f"{row['pieces']} | {row['seconds_median']:.2f} | {row['gbps_median']:.2f} ({row['gbps_min']:.2f}-"
                     f"{row['gbps_max']:.2f}) | {row['peak_rss_max'] / MiB:.0f} / {row['growth_max'] / MiB:.0f} | "
                     f"{', '.join(f'{g / MiB:.0f}' for g in row['per_rank_growth'])} |")
    lines += ["", "## Peak RSS per rank vs N (2 ranks; naive: one process)", "",
              "One fresh 2-rank job per cell (`run_merge` in-process under torchrun). Cells: RSS growth while merging "
              "(peak RSS of the whole process) per rank, MiB. The whole process includes ~0.5 GiB of torch / "
              "megatron imports.", "",
              "| N | " + " | ".join(f"engine {b} MiB: growth (peak) per rank" for b in budgets) + " | naive: growth (peak) |",
              "|---|" + "---|" * (len(budgets) + 1)]
    for k in sorted({r["n"] for r in agg["rss"]} | set(naive)):
        cells = []
        for b in budgets:
            row = _find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b)
            cells.append("-" if row is None else ", ".join(f"{g / MiB:.0f} ({p / MiB:.0f})" for g, p in
                                                           zip(row["per_rank_growth"], row["per_rank_peak_rss"])))
        nv = naive.get(k)
        cells.append("-" if nv is None else f"{nv['rss_growth'] / MiB:.0f} ({nv['peak_rss'] / MiB:.0f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "## Whole command", "",
              "Wall time from launch to exit (torchrun, interpreter start, imports, process group, selection, planning, "
              "the merge, metadata, publish), median over rounds; *engine* is the timed loop from `pma_merge.json`.", "",
              "| command | wall s | engine s | GB/s (engine) | rest s | busiest rank peak RSS / growth MiB |", "|---|---|---|---|---|---|"]
    for row in agg["cli"]:
        lines.append(f"| `{row['label']}`: `{row['command'][:90]}...` | {row['wall_median']:.1f} | {row['engine_median']:.2f} | "
                     f"{row['gbps_median']:.2f} | {row['wall_median'] - row['engine_median']:.1f} | "
                     f"{row['peak_rss_max'] / MiB:.0f} / {row['growth_max'] / MiB:.0f} |")
    st = result["startup"]
    lines += ["", f"Start-up parts, measured alone: bare `python -c pass` {st['bare_interpreter_s']:.2f} s; importing "
              f"`pma_train.cli.merge` (hydra, omegaconf, config) {st['imports']['cli_s']:.2f} s, then "
              f"`pma_train.merge.engine` (torch, torch.distributed.checkpoint) {st['imports']['engine_s']:.2f} s; "
              f"`pma-merge ... dry_run=true` (1 process: imports, hydra, selection; no merge) "
              f"{st.get('pma_merge_dry_run_s', float('nan')):.1f} s; `torchrun --nproc-per-node 2` of a worker that only "
              f"imports the engine, joins the gloo group and leaves {st.get('torchrun_2_noop_s', float('nan')):.1f} s."]
    if "lean" in result:
        lines += [""] + merge_startup.markdown_lines(result["lean"])
    if result["cli_runs"]:
        lines += ["", "stdout line of the last 2-rank run:", "", "```",
                  next((r["stdout_line"] for r in reversed(result["cli_runs"]) if r["label"] == "torchrun 2 ranks"), ""), "```"]
    if naive:
        lines += ["", "## Naive baseline (one process, loads everything)", "",
                  "`dcp_to_torch_save` per input into a temporary .pt, `torch.load`, all N state dicts kept, weighted fp32 "
                  "sum per tensor, `torch.save` of the result. Peak RSS: psutil sampling every 5 ms (and ru_maxrss).", "",
                  "| N | total s | dcp_to_torch_save s | torch.load s | average s | torch.save s | GB/s of input | "
                  "process wall s | peak RSS MiB | growth MiB | ru_maxrss MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, row in sorted(naive.items()):
            t = row["times"]
            lines.append(f"| {k} | {row['seconds']:.1f} | {t['dcp_to_torch_save']:.1f} | {t['torch_load']:.1f} | "
                         f"{t['average']:.1f} | {t['torch_save_output']:.1f} | {row['input_bytes'] / row['seconds'] / GB:.2f} | "
                         f"{row.get('wall_s', float('nan')):.1f} | "
                         f"{row['peak_rss'] / MiB:.0f} | {row['rss_growth'] / MiB:.0f} | {row['ru_maxrss'] / MiB:.0f} |")
    if "profile" in result:
        prof = result["profile"]
        lines += ["", "## Where the engine's time goes", "",
                  f"One rank, one thread, N={prof['n']}, budget {prof['budget_mb']} MiB, {prof['pieces']} pieces, "
                  f"{prof['bytes_read'] / GiB:.2f} GiB read, {prof['bytes_written'] / MiB:.0f} MiB written: timers around "
                  f"the engine's own functions (exclusive times; the timed loop took {prof['seconds']:.2f} s = "
                  f"{prof['read_gbps']:.2f} GB/s, the whole `run_merge` call {prof['call_s']:.2f} s).", "",
                  "| part | seconds | share of the loop | GB of input per second of this part |", "|---|---|---|---|"]
        for label, seconds in profile_rows(prof):
            share = seconds / prof["seconds"] if prof["seconds"] else 0
            rate = f"{prof['bytes_read'] / seconds / GB:.1f}" if seconds > 1e-6 else "-"
            lines.append(f"| {label} | {seconds:.2f} | {share:.0%} | {rate} |")
        lines.append(f"| outside the loop (selection done before; planning, token broadcast, barriers, "
                     f"metadata, publish) | {prof['call_s'] - prof['seconds']:.2f} | | |")
        prim = prof.get("primitives")
        if prim:
            lines += ["", f"Primitive costs ({prim['threads']} thread, one {prim['block_mb']} MiB fp32 block, median of 5):", "",
                      "| operation | GB/s | ms per 64 MiB |", "|---|---|---|"]
            for name, v in prim["ops"].items():
                lines.append(f"| {name} | {v['gbps']:.2f} | {v['ms_per_64MB']:.1f} |")
    if "py_spy" in result:
        spy = result["py_spy"]
        lines += ["", f"py-spy ({spy['rate_hz']} Hz, native stacks, {spy['samples']} samples inside `run_merge`, a plain 1-rank run at "
                  f"{spy['plain_run']['read_gbps']:.2f} GB/s, slowed by the sampling), innermost engine frame -> native frame:", "",
                  "| frame | share |", "|---|---|"]
        for row in spy["top"]:
            lines.append(f"| `{row['frame']}` | {row['share']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result["inputs"]["n"]
    budgets = sorted({r["budget_mb"] for r in agg["rss"]}, reverse=True)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0][0]
    labels, values = ["raw read"], [result["raw_read"]["gbps_median"]]
    for row in sorted(agg["engine"], key=lambda r: (r["ranks"], r["threads"], -r["budget_mb"])):
        if row["n"] == n:
            labels.append(f"{row['ranks']} rank x{row['threads']} thr\n{row['budget_mb']} MiB")
            values.append(row["gbps_median"])
    naive = {r["n"]: r for r in result.get("naive", [])}
    if n in naive:
        labels.append("naive")
        values.append(naive[n]["input_bytes"] / naive[n]["seconds"] / GB)
    ax.bar(range(len(values)), values, color=["#888"] + ["#3a7"] * (len(values) - 1))
    ax.axhline(TARGET_GBPS, color="r", ls="--", lw=1, label=f"target {TARGET_GBPS} GB/s")
    ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=40, ha="right")
    ax.set_ylabel("GB of input / s")
    ax.set_title(f"Throughput, N={n} ({result['inputs']['bytes_total'] / GiB:.2f} GiB), warm cache")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ns = sorted({r["n"] for r in agg["rss"]})
    width = 0.8 / (len(budgets) + 1)
    for i, b in enumerate(budgets):
        ys = [max(_find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b)["per_rank_peak_rss"]) / MiB
              if _find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b) else 0 for k in ns]
        ax.bar([x + i * width for x in range(len(ns))], ys, width, label=f"engine, busiest of 2 ranks, budget {b} MiB")
    if naive:
        ax.bar([x + len(budgets) * width for x in range(len(ns))], [naive[k]["peak_rss"] / MiB if k in naive else 0 for k in ns],
               width, label="naive (one process)", color="#c55")
    ax.set_xticks([x + width * len(budgets) / 2 for x in range(len(ns))], [f"N={k}" for k in ns])
    ax.set_ylabel("peak RSS, MiB (whole process)")
    ax.set_title("Peak RSS per rank vs N")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for i, b in enumerate(budgets):
        ys = [max(_find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b)["per_rank_growth"]) / MiB
              if _find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b) else None for k in ns]
        ax.plot(ns, ys, "o-", label=f"engine growth while merging, budget {b} MiB")
        ax.axhline(b, ls=":", color=ax.lines[-1].get_color(), lw=1)
    if naive:
        ax.plot(sorted(naive), [naive[k]["rss_growth"] / MiB for k in sorted(naive)], "s--", color="#c55",
                label="naive (one process), growth")
        ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("MiB")
    ax.set_title("RSS growth of the busiest rank while merging (dotted: budget)")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    if "profile" in result:
        rows = profile_rows(result["profile"])
        ax.barh([r[0][:48] for r in rows], [r[1] for r in rows], color="#47a")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("seconds")
        ax.set_title(f"Engine time, 1 rank, N={result['profile']['n']} ({result['profile']['read_gbps']:.2f} GB/s)")
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] in WORKERS and argv is None:
        WORKERS[sys.argv[1]](sys.argv[2:])
        return
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        directory, name = path.parent, path.stem
    else:
        result = run_benchmark(args)
        directory = Path(args.results_dir)
        name = BASENAME + ("_quick" if args.quick else "")
    agg = aggregate(result)
    result["aggregate"] = agg
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (directory / f"{name}.md").write_text(markdown(result, agg))
    plot(result, agg, directory / f"{name}.png")
    print(f"wrote {directory / name}.md, .json, .png")


if __name__ == "__main__":
    main()
