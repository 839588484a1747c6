"""Model build time and peak RSS per rank: dense_2b (byte vocabulary) at TP=1 and TP=2 on CPU.

    python benchmarks/model_build.py [--before DIR] [--layers N ...] [--precision fp32] [--timeout S]
Each case is one torchrun job that starts the process group, then times `build_model` (modules +
layout-invariant init) and samples the rank's RSS around it. `--before DIR` runs the same cases with
the pma_train package found in DIR too (e.g. `git archive <commit> pma_train model_configs | tar -x -C
DIR`), so before and after are measured in one run on one machine. A case stopped by `--timeout` is
reported as "> timeout". Writes results/model_build.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GB = 1e9


def worker(args: argparse.Namespace) -> None:
    """One rank of a case: whatever pma_train PYTHONPATH points at."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from pma_train.config import JobConfig, ModelConfig
    from pma_train.model import build_model
    from pma_train.parallel import init_distributed
    from pma_train.platform import detect
    from pma_train.rss import PeakRss

    cfg = JobConfig()
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(Path(args.model_dir) / f"{args.model}.yaml"))
    if args.layers:
        model.num_layers = args.layers
    cfg.model = OmegaConf.to_object(model)
    cfg.parallel.tp = args.tp
    cfg.train.precision = args.precision
    platform = detect()
    init_distributed(cfg.parallel, platform, cfg.seed)
    dist.barrier()
    with PeakRss() as rss:
        start = time.perf_counter()
        chunks = build_model(cfg, platform, vocab_size=257)  # the byte tokenizer's vocabulary
        seconds = time.perf_counter() - start
    params = sum(p.numel() for c in chunks for p in c.parameters())
    param_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    digest = float(sum(p.detach().double().abs().sum() for c in chunks for p in c.parameters()))
    row = {"rank": dist.get_rank(), "seconds": seconds, "rss_before": rss.start, "rss_peak": rss.peak,
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "params": params,
           "param_bytes": param_bytes, "abs_sum": digest, "threads": torch.get_num_threads()}
    Path(args.out).with_suffix(f".{dist.get_rank()}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def run_case(code: Path, tp: int, layers: int, precision: str, timeout: float, work: Path) -> dict:
    out = work / f"{code.name}-tp{tp}-l{layers}"
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // tp)),
               PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", f"--master-port={port}",
           str(Path(__file__).resolve()), "--worker", f"--out={out}", f"--tp={tp}", f"--layers={layers}",
           f"--precision={precision}", f"--model-dir={code / 'model_configs'}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks: one session
        proc.communicate()
        return {"timed_out": True, "wall": time.perf_counter() - start}
    if proc.returncode != 0:
        raise RuntimeError(f"case failed ({proc.returncode}):\n{stderr[-4000:]}")
    ranks = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(tp)]
    return {"timed_out": False, "wall": time.perf_counter() - start, "ranks": ranks}


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Model build: time and peak RSS per rank",
        "",
        "Written by `benchmarks/model_build.py`. `build_model` of `dense_2b` with the byte tokenizer's vocabulary",
        "(257, padded to 384): module construction plus the layout-invariant init, on CPU ranks over gloo,",
        f"{meta['precision']} parameters. *before*: pma_train at {meta['before_label']}; *after*: this tree.",
        "*build s*: slowest rank's `build_model` wall time. *RSS before*: the rank's RSS after imports and process-group",
        "start; *peak*: its highest RSS during the build (sampled every 5 ms); *growth*: peak minus before;",
        "*params GB*: the bytes of the rank's own parameters (what any build must hold).",
        "",
        "| code | layers | TP | build s | RSS before GB | peak RSS GB | growth GB | params GB | growth / params | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        label = f"| {case['code']} | {case['layers']} | {case['tp']} |"
        if case["timed_out"]:
            lines.append(f"{label} > {case['wall']:.0f} (stopped) | | | | | | |")
            continue
        r = max(case["ranks"], key=lambda x: x["rss_peak"])
        growth = r["rss_peak"] - r["rss_before"]
        lines.append(f"{label} {max(x['seconds'] for x in case['ranks']):.1f} | {r['rss_before'] / GB:.2f} | "
                     f"{r['rss_peak'] / GB:.2f} | {growth / GB:.2f} | {r['param_bytes'] / GB:.2f} | "
                     f"{growth / r['param_bytes']:.2f} | {r['threads']} |")
    lines += ["", f"Machine: {meta['cpus']} CPUs, {meta['mem_gb']:.0f} GB; load average {meta['load_start']} at the start, "
              f"{meta['load_end']} at the end; {meta['date']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="dense_2b")
    parser.add_argument("--model-dir", default=str(REPO / "model_configs"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, nargs="+", default=[0], help="num_layers overrides (0: the preset's)")
    parser.add_argument("--tps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--before", help="a directory holding the previous pma_train and model_configs")
    parser.add_argument("--before-label", default="the previous commit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    args = parser.parse_args()
    if args.worker:
        args.layers = args.layers[0]
        return worker(args)
    codes = [("before", Path(args.before).resolve())] if args.before else []
    codes.append(("after", REPO))
    results = {"meta": {"precision": args.precision, "before_label": args.before_label, "cpus": os.cpu_count(),
                        "mem_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
                        "load_start": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
               "cases": []}
    with tempfile.TemporaryDirectory() as work:
        for layers in args.layers:
            for tp in args.tps:
                for name, code in codes:
                    case = run_case(code, tp, layers, args.precision, args.timeout, Path(work))
                    results["cases"].append({"code": name, "tp": tp, "layers": layers or "preset", **case})
                    print(json.dumps(results["cases"][-1]), flush=True)
    results["meta"]["load_end"] = os.getloadavg()[0]
    (HERE / "results" / "model_build.json").write_text(json.dumps(results, indent=1))
    (HERE / "results" / "model_build.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
