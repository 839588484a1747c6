"""Host memory per rank of the merge tracker (`track.*`, pma_train/merge/track.py): issue 14 item 2.

The parameters are dense_411m's (byte tokenizer, ~252M; shapes read off megatron-core's model built
on the meta device), fp32 as on CPU, identical on every data-parallel rank (TP=PP=1, so the replica
group is the world). One torchrun job per setting; each rank reports:
- the bytes of its snapshots (tensor sizes) and the RSS they add after n grid points;
- the peak RSS added, over that, while the merge is swapped into the model for an evaluation;
- that the live weights are back bit for bit after it (a checksum of every parameter).
"before" is the tracker as of --base (git show): n full fp32 copies per rank, whatever DP, and a
full clone plus the full merge while it evaluates. The new one is run at DP=1 and DP=2, fp32 and bf16,
against the formula n x model / DP x bytes, with its snapshots in host memory (track.storage=host)
or in files (track.storage=disk, under --dir: then the formula is the disk's, and the host's is the
64 MiB block).

    python benchmarks/tracker_memory.py [--n 3] [--model dense_411m] [--rows after:2:fp32:disk,...]
--rows measures only the settings named (impl:dp:dtype:storage) and replaces them in, or adds them to,
the rows of results/tracker_memory.json; each row keeps the date and machine load of its run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "01de5b1"  # the last commit with the unsharded tracker
GiB = 2**30
ALL_ROWS = "before:1:fp32:host,after:1:fp32:host,after:2:fp32:host,after:2:bf16:host,after:2:fp32:disk,after:2:bf16:disk"


def model_shapes(model: str) -> list[list[int]]:
    """The parameter shapes of one rank's model (TP=PP=1), from megatron-core's meta-device build."""
    from omegaconf import OmegaConf

    from pma_train.conf import model_configs_dir
    from pma_train.config import JobConfig, ModelConfig
    from pma_train.data import build_tokenizer
    from pma_train.plan.count import build_chunks, fake_rank, meta_build_environment, quiet

    cfg = JobConfig()
    cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                    OmegaConf.load(model_configs_dir() / f"{model}.yaml")))
    vocab = build_tokenizer(cfg.data.tokenizer).vocab_size
    with quiet(), meta_build_environment(), fake_rank(cfg, 0):
        return [list(p.shape) for chunk in build_chunks(cfg, vocab) for p in chunk.parameters()]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _old_tracker_class(base: str):
    source = subprocess.run(["git", "show", f"{base}:pma_train/merge/track.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("track_before")
    exec(compile(source, f"{base}:pma_train/merge/track.py", "exec"), module.__dict__)
    return module.MergeTracker


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from pma_train.merge.track import GATHER_BYTES, MergeTracker
    from pma_train.merge.track_store import open_store
    from pma_train.rss import PeakRss

    dist.init_process_group("gloo")
    torch.manual_seed(0)  # replicas: the same weights on every rank
    params = [torch.nn.Parameter(torch.empty(shape).uniform_(-0.05, 0.05)) for shape in json.loads(args.shapes.read_text())]
    model_bytes = sum(p.numel() * p.element_size() for p in params)

    def checksum() -> list[float]:
        return [p.detach().double().sum().item() for p in params]

    if args.impl == "before":
        tracker = _old_tracker_class(args.base)([torch.nn.ParameterList(params)], args.n, "sma", 0.2)
    else:
        directory = Path(args.dir) / f"rank_{dist.get_rank():05d}" if args.storage == "disk" else None
        tracker = MergeTracker([(params, dist.group.WORLD)], args.n, "sma", 0.2, dtype=args.dtype,
                               store=open_store(args.storage, directory, GATHER_BYTES))
    dist.barrier()
    start = _rss()
    add_seconds = []
    with PeakRss() as add_peak:
        for point in range(args.n):
            with torch.no_grad():
                for p in params:
                    p.add_(1e-3)  # a step of training between grid points
            began = time.perf_counter()
            tracker.add(point)
            add_seconds.append(time.perf_counter() - began)
    snapshots_rss = _rss() - start
    if args.impl == "before":
        snapshot_bytes, disk_bytes = sum(t.nbytes for _, ts in tracker.snapshots for t in ts), 0
    else:
        snapshot_bytes, disk_bytes = tracker.snapshot_bytes(), tracker.disk_bytes()
    live = checksum()
    dist.barrier()
    began = time.perf_counter()
    with PeakRss() as peak:
        with tracker.swapped_in():
            pass  # the evaluation runs here
    swap_seconds = time.perf_counter() - began
    if args.impl != "before":
        tracker.close()
    line = {"rank": dist.get_rank(), "dp": dist.get_world_size(), "impl": args.impl, "dtype": args.dtype,
            "storage": args.storage, "n": args.n, "params": sum(p.numel() for p in params), "model_bytes": model_bytes,
            "snapshot_bytes": snapshot_bytes, "disk_bytes": disk_bytes, "snapshots_rss": snapshots_rss,
            "add_peak": add_peak.peak - start,
            "eval_peak_over_snapshots": peak.peak - start - snapshots_rss,
            "restored": checksum() == live, "add_seconds": sum(add_seconds) / len(add_seconds),
            "swap_seconds": swap_seconds}
    os.write(1, f"TRACKER {json.dumps(line)}\n".encode())
    dist.destroy_process_group()


def run_setting(args, shapes: Path, impl: str, dp: int, dtype: str, storage: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={dp}", "--standalone",
           str(Path(__file__).resolve())]
    # The setting goes by environment: torchrun would take --n for one of its own options.
    setting = {"shapes": str(shapes), "impl": impl, "dtype": dtype, "n": args.n, "base": args.base,
               "storage": storage, "dir": str(args.dir)}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore",
               TRACKER_MEMORY_WORKER=json.dumps(setting))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{impl} dp={dp} {dtype} {storage} failed:\n{proc.stderr[-4000:]}")
    lines = [json.loads(x[len("TRACKER "):]) for x in proc.stdout.splitlines() if x.startswith("TRACKER ")]
    return sorted(lines, key=lambda r: r["rank"])


FIRST_RUN = "2026-11-26 04:09 UTC"  # the rows measured before rows carried their own date and load


def report(args, rows: list[dict]) -> str:
    model = rows[0]["model_bytes"]
    loads = {}
    for r in rows:
        loads.setdefault(r.get("when", FIRST_RUN), r["load"])
    out = [f"# Merge tracker host memory per rank ({args.model}, byte tokenizer, fp32 parameters, n={args.n})", "",
           f"{rows[0]['params']:,} parameters = {model / GiB:.3f} GiB fp32 per rank (TP=PP=1). Machine load "
           "at the start of each run (uptime):", "",
           *[f"- {when}: {load}" for when, load in loads.items()], "",
           "Per rank (the worst rank of each job). *storage*: track.storage, where the snapshots are (host "
           "memory, or files on disk). *formula* = n x model / DP x bytes per element, of host memory or "
           "of disk as the storage says; *x model* = over the fp32 model bytes. *add peak* = RSS added while the "
           "n snapshots are taken (RSS after them: *snapshots RSS*); *eval peak* = RSS added during the "
           "swapped-in evaluation, over the snapshots. The goal (issue 14) is on the column *x model "
           "(snapshots + eval)*: host memory the tracker adds at its peak.", "",
           "| tracker | DP | snapshots | storage | snapshot bytes | formula | x model | snapshots RSS | add peak | "
           "eval peak | x model (snapshots + eval) | live restored | add s | swap s | measured |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_elem = 2 if r["dtype"] == "bf16" else 4
        formula = r["n"] * -(-r["params"] // (1 if r["impl"] == "before" else r["dp"])) * per_elem
        storage = r.get("storage", "host")
        stored = r["disk_bytes"] if storage == "disk" else r["snapshot_bytes"]
        add_peak = f"{r['add_peak'] / GiB:.3f} GiB" if "add_peak" in r else "-"
        out.append(f"| {r['impl']} | {r['dp']} | {r['dtype']} | {storage} | {stored / GiB:.3f} GiB on {storage} | "
                   f"{formula / GiB:.3f} GiB | {stored / model:.2f} | {r['snapshots_rss'] / GiB:.3f} GiB | {add_peak} | "
                   f"{r['eval_peak_over_snapshots'] / GiB:.3f} GiB | "
                   f"{(r['snapshots_rss'] + r['eval_peak_over_snapshots']) / model:.2f} | {r['restored']} | "
                   f"{r['add_seconds']:.2f} | {r['swap_seconds']:.2f} | {r.get('when', FIRST_RUN)} |")
    n = args.n
    out += ["", "What it means:",
            f"- The snapshots take exactly the formula (tensor bytes = RSS added, to 0.01 GiB): per rank "
            f"n x model / DP x bytes, so sharding divides them by DP and bf16 halves them again. The tracker "
            f"as it was kept n full fp32 copies on every rank (x{n}.00 whatever DP).",
            "- During an evaluation of the merge, the tracker as it was added a full clone of the live weights and "
            "the full fp32 merge (2x the model); the sharded one adds this rank's share of the live weights "
            "(1/DP of the model, in the parameters' dtype) plus the 64 MiB all-gather buffer and its pieces.",
            f"- In host memory, issue 14's goal (n={n}, DP=2: the tracker adds <= 0.6x the fp32 model bytes per "
            f"rank) is not reached with n snapshots of 2 bytes or more per element: n x (1/DP) x (bytes / 4) = "
            f"{n} x 1/2 x 1/2 = {n / 4:.2f} with bf16 snapshots. It holds for n x bytes / (4 x DP) <= 0.6: bf16 at "
            "n=3 from DP=3 (0.50x), bf16 at n=2 and DP=2 (0.50x), fp32 at n=3 from DP=5. Under bf16 mixed "
            "precision (GPU runs) the parameters are bf16, and `track.dtype=param` stores them as such with no "
            "loss at all.",
            "- With `track.storage=disk` the snapshots and, during an evaluation, the live share are files "
            "(the formula's bytes on disk, plus the live share while it evaluates); the host memory is the "
            "buffers they move through, sized by track.buffer_mb (64 MiB): while snapshots are taken one "
            "block (*add peak*), while the merge is evaluated the all-gather's output, gloo's temporaries, "
            "this rank's fp32 accumulator and the block read from a file (bf16: and its "
            "fp32 widening), each of the last at most buffer / DP (*eval peak*). None of it grows with the "
            "model size or n. The files go through the page cache, which the kernel reclaims: it is not "
            "the process's memory (RSS). The disk rows' times include writing and reading those files on "
            "this host's disk (shared).",
            *[f"- Goal at n={r['n']}, DP={r['dp']}, {r['dtype']} snapshots on disk: the tracker adds "
              f"{(r['snapshots_rss'] + r['eval_peak_over_snapshots']) / model:.2f}x the fp32 model bytes per rank "
              f"(<= 0.6: {'met' if r['snapshots_rss'] + r['eval_peak_over_snapshots'] <= 0.6 * model else 'NOT met'})."
              for r in rows if r.get("storage") == "disk"],
            "- The times are of a 2-core host shared with other jobs (load above): they are not comparable "
            "between rows. Snapshots are taken once per grid point, the swap once per evaluation."]
    return "\n".join(out) + "\n"


def _key(row: dict) -> tuple:
    return row["impl"], row["dp"], row["dtype"], row.get("storage", "host")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dense_411m")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--rows", default=ALL_ROWS, help="impl:dp:dtype:storage settings, comma-separated")
    parser.add_argument("--dir", type=Path, default=Path("/tmp") / f"tracker-memory-{os.getpid()}",
                        help="track.storage=disk's files (a fast local disk)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    if "TRACKER_MEMORY_WORKER" in os.environ:
        setting = json.loads(os.environ["TRACKER_MEMORY_WORKER"])
        return worker(argparse.Namespace(**{**setting, "shapes": Path(setting["shapes"])}))
    args = parser.parse_args()

    results = args.out / "tracker_memory.json"
    previous = json.loads(results.read_text()) if results.exists() and args.rows != ALL_ROWS else {"rows": []}
    rows = [{"load": previous.get("load"), **r} for r in previous["rows"]]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shapes = Path(f"/tmp/tracker-memory-{os.getpid()}-shapes.json")
    shapes.write_text(json.dumps(model_shapes(args.model)))
    try:
        # The old tracker's per-rank memory does not depend on DP (full copies): measured at DP=1.
        for setting in args.rows.split(","):
            impl, dp, dtype, storage = setting.split(":")
            ranks = run_setting(args, shapes, impl, int(dp), dtype, storage)
            worst = max(ranks, key=lambda r: r["snapshots_rss"] + r["eval_peak_over_snapshots"])
            row = {**worst, "restored": all(r["restored"] for r in ranks), "load": load, "when": when}
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
            print(json.dumps(row), flush=True)
    finally:
        shapes.unlink()
        if args.dir.exists():
            shutil.rmtree(args.dir)
    args.out.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"rows": rows}, indent=2))
    text = report(args, rows)
    (args.out / "tracker_memory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
