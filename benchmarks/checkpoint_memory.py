"""Host memory and time of a checkpoint save and resume, per optimizer format, DP size and model size.

Each case runs the real trainer under torchrun (gloo, CPU, fp32, byte tokenizer, seq 128, one
micro-batch of 1 per rank) in two launches:
  1. build, two training steps (peak RSS per rank = "training only"), then one save
     (`Trainer.save`, the trainer's own) timed; the peak RSS after it = "with a save";
  2. a fresh job that resumes from that checkpoint and trains one step: its peak RSS = "on resume".
Peaks are each rank's kernel high-water mark (ru_maxrss). The save time is set beside the time to
write and fsync the same number of bytes to the same directory (rank 0, one 64 MiB buffer reused).

    python benchmarks/checkpoint_memory.py                 # 252M, DP 1 and 2, both formats
    python benchmarks/checkpoint_memory.py --models 252m 504m --formats dp_reshardable

Writes results/checkpoint_memory.{json,md} (merged with the cases already there) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASENAME = "checkpoint_memory"
# dense_411m with the byte tokenizer: 252M parameters (its 152k-entry embedding becomes 384 rows).
MODELS = {
    "252m": ["model=dense_411m"],
    "504m": ["model=dense_411m", "model.num_layers=48"],
    "64m": ["model=dense_411m", "model.num_layers=6"],
    "127m": ["model=dense_411m", "model.num_layers=12"],
    "tiny": ["model=tiny"],  # a smoke test of this script (not in the results)
}
FORMATS = ("fully_reshardable", "dp_reshardable")
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["252m"], choices=list(MODELS))
    p.add_argument("--dp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--scratch", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--phase", choices=("save", "resume"), help=argparse.SUPPRESS)  # internal: one launch
    p.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one launch (every rank)


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _raw_write_s(directory: Path, nbytes: int) -> float:
    """Write and fsync nbytes to a new file in directory, as the checkpoint writer does."""
    block = bytearray(os.urandom(1 << 20)) * 64
    path = directory / "raw-write-probe"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(memoryview(block)[:min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def run_phase(phase: str, overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    import psutil

    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config
    from pma_train.rss import PeakRss
    from pma_train.train.trainer import Trainer

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        job = to_job_config(compose("train", overrides=overrides))
    start = time.perf_counter()
    trainer = Trainer(job)
    out = {"rank": int(os.environ.get("RANK", 0)), "setup_s": time.perf_counter() - start,
           "after_setup": _peak()}
    for _ in range(1 if phase == "resume" else 2):
        trainer.train_step()
    out["after_train"] = _peak()
    out["rss_before"] = psutil.Process().memory_info().rss  # steady state, without the build's transients
    if phase == "save":
        start = time.perf_counter()
        with PeakRss() as rss:
            path = trainer.save()
        out["save_s"] = time.perf_counter() - start
        out["save_growth"] = rss.peak - rss.start  # what the save itself adds above the steady state
        out["after_save"] = _peak()
        if out["rank"] == 0:
            out["checkpoint_bytes"] = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
            out["raw_write_s"] = _raw_write_s(path.parent, out["checkpoint_bytes"])
    trainer.checkpointer.lock.release()
    return out


# ----------------------------------------------------------------------------- the cases (parent)


def _launch(phase: str, overrides: list[str], dp: int, env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={dp}", "--standalone",
           __file__, "--phase", phase, "--overrides", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    rows = [json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) != dp:
        tail = (proc.stdout + proc.stderr)[-4000:]
        return [{"error": f"exit {proc.returncode}: {tail}"}]
    return sorted(rows, key=lambda r: r["rank"])


def run_case(model: str, dp: int, fmt: str, scratch: Path, env: dict) -> dict:
    run_dir = scratch / f"{model}-dp{dp}-{fmt}"
    overrides = [*MODELS[model], f"run.dir={run_dir}", "data.tokenizer.type=byte", "train.precision=fp32",
                 "train.seq_length=128", "train.micro_batch_size=1", f"train.global_batch_size={dp}",
                 "train.iters=10", "train.eval_interval=1000", "checkpoint.interval=1000",
                 "checkpoint.save_at_end=false", f"checkpoint.optimizer_format={fmt}", "logging.progress_bar=false",
                 "schedule.warmup_iters=1"]
    case = {"model": model, "dp": dp, "format": fmt}
    try:
        case["save"] = _launch("save", overrides, dp, env)
        if "error" not in case["save"][0]:
            case["resume"] = _launch("resume", overrides, dp, env)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return case


def _summary(case: dict) -> dict | None:
    save, resume = case.get("save", [{}]), case.get("resume", [{"error": "not run"}])
    if "error" in save[0]:
        return None
    train = max(r["after_train"] for r in save)
    out = {"train_gib": train / GIB, "save_gib": max(r["after_save"] for r in save) / GIB,
           "save_s": max(r["save_s"] for r in save), "bytes": save[0]["checkpoint_bytes"],
           "raw_s": save[0]["raw_write_s"], "resume_gib": None}
    if "error" not in resume[0]:
        out["resume_gib"] = max(r["after_train"] for r in resume) / GIB
    return out


def markdown(cases: list[dict], load: str) -> str:
    lines = [f"Machine load (uptime) at the end of the run: {load}", "",
             "Peak RSS per rank (the largest rank), GiB; ratios to the training-only peak of the same case.", "",
             "| model | DP | optimizer format | training only | with a save | ratio | on resume | ratio "
             "| checkpoint | save | raw write + fsync | save / raw |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        s = _summary(c)
        if s is None:
            lines.append(f"| {c['model']} | {c['dp']} | {c['format']} | failed: "
                         f"{c['save'][0]['error'].splitlines()[-1][:120]} |||||||||")
            continue
        resume = (f"{s['resume_gib']:.2f} | {s['resume_gib'] / s['train_gib']:.2f}x" if s["resume_gib"]
                  else "failed | -")
        lines.append(f"| {c['model']} | {c['dp']} | {c['format']} | {s['train_gib']:.2f} | {s['save_gib']:.2f} | "
                     f"{s['save_gib'] / s['train_gib']:.2f}x | {resume} | {s['bytes'] / 1e9:.2f} GB | "
                     f"{s['save_s']:.1f} s | {s['raw_s']:.1f} s | {s['save_s'] / s['raw_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.phase:
        print("RESULT " + json.dumps(run_phase(args.phase, args.overrides)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{BASENAME}.json"
    cases = json.loads(json_path.read_text()) if json_path.is_file() else []
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="pma-ckmem-"))
    try:
        for model in args.models:
            for dp in args.dp:
                for fmt in args.formats:
                    case = run_case(model, dp, fmt, scratch, env)
                    case["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                    cases = [c for c in cases if (c["model"], c["dp"], c["format"]) != (model, dp, fmt)] + [case]
                    json_path.write_text(json.dumps(cases, indent=1))
                    print(json.dumps({k: case[k] for k in ("model", "dp", "format")}), _summary(case), flush=True)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    order = {m: i for i, m in enumerate(MODELS)}
    cases.sort(key=lambda c: (order[c["model"]], c["dp"], FORMATS.index(c["format"])))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    table = markdown(cases, load)
    (args.results_dir / f"{BASENAME}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
