"""The measured subprocesses (`merge_throughput.py _<name> ...`): engine jobs, the naive baseline, start-up parts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from merge_bench.common import MiB, V_TOKENS, RssSampler


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
