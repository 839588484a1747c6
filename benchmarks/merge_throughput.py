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
  costs of the primitive operations, and (if py-spy is installed) a sampled profile;
- the lean path (merge_startup.py): `pma-merge dry_run=true` wall, whole-process peak RSS, PSS and USS
  per rank of `torchrun --nproc-per-node 2 pma-merge`, and what each import adds;
- with `--megatron-lm DIR`: the same merge by Megatron-LM's own tools/checkpoint/weighted_merge.py
  (pull request #5114, taken from that checkout, never copied here) on the same inputs, warm and cold
  page cache (merge_bench/megatron_lm.py says how the inputs and the cold cache are made).

    python benchmarks/merge_throughput.py            # full run (~5-10 min on 2 cores)
    python benchmarks/merge_throughput.py --quick    # small model, N=4, 1 round (smoke test, ~2-3 min)
    python benchmarks/merge_throughput.py --megatron-lm ~/Megatron-LM   # + the comparison

The parts live in merge_bench/: common (constants, launching), inputs, workers (the measured
subprocesses, run as `merge_throughput.py _<worker>`), profiling, phases, megatron_lm, report, plots.

Results: benchmarks/results/merge_throughput.{md,json,png} (`--quick`: merge_throughput_quick.*).
Every process runs with OMP_NUM_THREADS=1 (torchrun's default for 2 ranks; see the report for why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from merge_bench import megatron_lm, phases
from merge_bench.common import BASENAME, GB, RESULTS_DIR, TARGET_GBPS, V_TOKENS, GiB, checkpoint_files, torchrun
from merge_bench.inputs import ensure_checkpoints, worker_generate
from merge_bench.plots import plot
from merge_bench.profiling import worker_profile
from merge_bench.report import aggregate, markdown
from merge_bench.workers import worker_engine, worker_imports, worker_naive, worker_noop

WORKERS = {"_noop": worker_noop, "_generate": worker_generate, "_engine": worker_engine, "_naive": worker_naive,
           "_profile": worker_profile, "_imports": worker_imports}



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
    p.add_argument("--megatron-lm", metavar="DIR", help="a Megatron-LM checkout with pull request #5114's "
                   "tools/checkpoint/weighted_merge.py (not part of pma-train): compare pma-merge with it")
    p.add_argument("--megatron-python", default=sys.executable, help="the interpreter that runs weighted_merge.py")
    p.add_argument("--compare-rounds", type=int, default=2, help="warm-cache rounds of (pma-merge, weighted_merge.py)")
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

    result = {"quick": args.quick, "machine": machine_info(base), "target_gbps": TARGET_GBPS,
              "conditions": {"threads_per_process": 1, "page_cache": "warm (all inputs read once before each phase)",
                             "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                             "uptime_start": _uptime()}}
    root, generated = ensure_checkpoints(args, base, log)
    files = checkpoint_files(root, args.n)
    input_bytes = sum(f.stat().st_size for f in files)
    result["inputs"] = {
        "root": str(root), "model": generated["spec"]["model"], "tp": 2, "dtype": "fp32", "params": generated["params"],
        "n": args.n, "bytes_per_checkpoint": input_bytes // args.n, "bytes_total": input_bytes,
        "files_per_checkpoint": len(files) // args.n, "v_tokens": V_TOKENS,
        "generate": {k: generated[k] for k in ("build_s", "save_s", "wall_s") if k in generated}}
    log(f"inputs: N={args.n}, {input_bytes / GiB:.2f} GiB ({input_bytes / GB:.2f} GB), "
        f"{generated['params'] / 1e6:.1f}M params; {shutil.disk_usage(base).free / GiB:.0f} GiB free")
    bench = phases.Bench(args, root, work, files, log, lambda r, o: merge_args(r, o, args),
                         lambda r, o: cli_commands(r, o, args))
    result["raw_read"] = phases.raw_read(bench)
    result["engine_runs"], result["cli_runs"] = phases.rounds(bench)
    result["engine_runs"] += phases.rss_sweep(bench)
    result["startup"], result["lean"] = phases.startup(bench)
    if not args.no_naive:
        result["naive"] = phases.naive(bench)
    if not args.no_profile:
        result.update(phases.profile(bench))
    if args.megatron_lm:
        result["megatron_lm"] = megatron_lm.compare(Path(args.megatron_lm), args.megatron_python, root, work, args.n,
                                                    bench.merge_args, args.compare_rounds, log)
    result["conditions"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["conditions"]["uptime_end"] = _uptime()
    result["total_benchmark_s"] = time.perf_counter() - t_start
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep_checkpoints:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def merge_args(root: Path, out: Path, args) -> list[str]:
    return ["progress_bar=false", f"root={root}", f"n={args.n}", f"v_tokens={V_TOKENS}", "method=sma",
            f"memory_budget_mb={args.budget_list[0]}", f"output={out}"]


def cli_commands(root: Path, out: Path, args) -> list[tuple[str, list[str], str]]:
    """(label, argv, how it reads in the report) of the whole-command runs."""
    common = merge_args(root, out, args)
    shown = " ".join(common).replace(str(root), "<root>").replace(str(out), "<out>")
    pma_merge = Path(sys.executable).parent / "pma-merge"
    plain = [str(pma_merge)] if pma_merge.exists() else [sys.executable, "-m", "pma_train.cli.merge"]
    return [("torchrun 2 ranks", torchrun(2) + ["-m", "pma_train.cli.merge"] + common,
             f"OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m pma_train.cli.merge {shown}"),
            ("pma-merge 1 rank (no torchrun)", plain + common, f"OMP_NUM_THREADS=1 pma-merge {shown}")]


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
