"""The benchmark's inputs: N torch_dist checkpoints of pma-train's HybridModel, generated once and reused."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from merge_bench.common import GLOBAL_BATCH, ITER_STEP, QUICK_MODEL, FULL_MODEL, SCRIPT, SEQ_LEN, parse, run, torchrun


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
    proc, wall = run(torchrun(2) + [str(SCRIPT), "_generate", "--root", str(root), "--count", str(n),
                                      "--model", json.dumps(model)])
    info = {"spec": spec, **parse(proc, "GENERATE"), "wall_s": wall}
    marker.write_text(json.dumps(info, indent=1))
    return root, info
