"""Where the engine's time goes: a timed 1-rank merge, per-GB costs of the primitive operations, py-spy."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from merge_bench.common import GB, MiB, V_TOKENS


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


def profile_rows(profile: dict) -> list[tuple[str, float]]:
    timers = profile["timers"]
    rows = [(PROFILE_LABELS[k], timers.get(k, 0.0)) for k in PROFILE_LABELS]
    accounted = sum(s for _, s in rows)
    rows.append(("rest of the timed loop (progress, RSS sampler, GIL, unwrapped)", max(0.0, profile["seconds"] - accounted)))
    return rows
