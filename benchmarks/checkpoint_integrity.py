"""What checkpoint checksums cost: save and load time with and without them, in the same run.

One process per model (the trainer's real `save_checkpoint` / `load_checkpoint`, model, optimizer and
scheduler, world 1 over gloo): `--rounds` rounds of save + load, alternating with / without checksums
(on-off, off-on, ...) so machine noise hits both alike; "without" replaces the two integrity calls of
checkpoint/state.py (record at save; verification at load, which hashes in a thread while the load runs)
by no-ops. Reported per model: median save and load
time of each side and the overhead; the cost of the integrity calls timed alone on the saved checkpoint
(robust to noise: the direct figure); and the checksum throughput of the algorithms (in memory, and
from a file in the page cache through the same code the verifier runs).

    python benchmarks/checkpoint_integrity.py                    # tiny (~7.6 MB) and h512x4 (~195 MB)
    python benchmarks/checkpoint_integrity.py --rounds 11 --results-dir /tmp/out

Writes results/checkpoint_integrity.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pma_train, not another installed one
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASENAME = "checkpoint_integrity"
CASES = {
    "tiny": ["model=tiny"],
    "h512x4": ["model=tiny", "model.hidden_size=512", "model.ffn_hidden_size=1408", "model.num_layers=4",
               "model.num_attention_heads=8", "model.num_query_groups=4"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="save + load rounds per side (alternating)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    p.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one case (own process)


def _trainer(overrides: list[str], run_dir: Path):
    from hydra import compose, initialize_config_dir

    from pma_train.conf import CONF_DIR, register_configs
    from pma_train.config import to_job_config
    from pma_train.train.trainer import Trainer

    register_configs()
    fixed = [f"run.dir={run_dir}", f"checkpoint.dir={run_dir / 'ckpt'}", "train.iters=10", "train.seq_length=32",
             "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_iters=1",
             "logging.progress_bar=false", "schedule.warmup_iters=1"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return Trainer(to_job_config(compose("train", overrides=fixed + overrides)))


@contextlib.contextmanager
def _checksums(enabled: bool):
    from pma_train.checkpoint import integrity

    saved = integrity.record_checksums, integrity.Verification
    if not enabled:
        integrity.record_checksums = lambda *args, **kwargs: None
        integrity.Verification = _NoVerification
    try:
        yield
    finally:
        integrity.record_checksums, integrity.Verification = saved


class _NoVerification:
    def __init__(self, *args, **kwargs):
        pass

    def finish(self) -> None:
        pass


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_case(name: str, rounds: int, scratch: Path) -> dict:
    from dataclasses import replace

    from pma_train.checkpoint import integrity
    from pma_train.checkpoint.state import load_checkpoint, save_checkpoint

    trainer = _trainer(CASES[name], scratch / "run")
    times = {side: {"save": [], "load": []} for side in ("on", "off")}
    direct = {"record": [], "verify": []}
    size = 0
    for r in range(rounds + 1):  # round 0 warms up (allocations, imports), not counted
        for side in (("on", "off") if r % 2 else ("off", "on")):
            root = scratch / side
            state = replace(trainer.state, iteration=r + 1)
            with _checksums(side == "on"):
                save_s = _timed(lambda: save_checkpoint(root, trainer.model, trainer.optimizer, trainer.scheduler, state))
                ckpt = root / f"iter_{r + 1:07d}"
                load_s = _timed(lambda: load_checkpoint(ckpt, trainer.model, trainer.optimizer, trainer.scheduler))
            if r:
                times[side]["save"].append(save_s)
                times[side]["load"].append(load_s)
            if side == "on" and r:
                direct["record"].append(_timed(lambda: integrity.record_checksums(ckpt)))
                direct["verify"].append(_timed(lambda: integrity.verify_checkpoint(ckpt)))
                size = sum(p.stat().st_size for p in ckpt.iterdir())
            shutil.rmtree(ckpt)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    # Per-round ratios pair each "with" with the "without" run next to it: steadier than a ratio of medians.
    paired = {op: med([a / b - 1 for a, b in zip(times["on"][op], times["off"][op])]) for op in ("save", "load")}
    return {"case": name, "checkpoint_bytes": size, "rounds": rounds, "paired_overhead": paired,
            "save_s": {s: med(times[s]["save"]) for s in times}, "load_s": {s: med(times[s]["load"]) for s in times},
            "record_s": med(direct["record"]), "verify_s": med(direct["verify"]),
            "all_s": {s: times[s] for s in times}}


# ----------------------------------------------------------------------------- throughput


def throughput(scratch: Path) -> dict:
    import zlib

    import xxhash

    from pma_train.checkpoint import integrity

    data = os.urandom(256 * 2**20)
    out = {}
    for name, fn in (("xxh3_64 (memory)", lambda: xxhash.xxh3_64(data).digest()),
                     ("crc32 zlib (memory)", lambda: zlib.crc32(data))):
        out[name] = len(data) / min(_timed(fn) for _ in range(5)) / 1e9
    path = scratch / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for algorithm in ("xxh3_64", "crc32"):
            best = min(_timed(lambda: integrity.digest_range(fd, 0, len(data), algorithm)) for _ in range(5))
            out[f"{algorithm} (page-cached file, as verified)"] = len(data) / best / 1e9
    finally:
        os.close(fd)
        path.unlink()
    return out


# ----------------------------------------------------------------------------- report


def markdown(cases: list[dict], rates: dict, load: str) -> str:
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    lines = [f"Machine load (uptime): {load}", "",
             "| model | checkpoint | save without | save with | save overhead | load without | load with "
             "| load overhead | record alone | verify alone |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        s, l_ = c["save_s"], c["load_s"]
        lines.append(f"| {c['case']} | {c['checkpoint_bytes'] / 1e6:.1f} MB | {s['off']:.3f} s | {s['on']:.3f} s | "
                     f"{pct(c['paired_overhead']['save'])} | {l_['off']:.3f} s | {l_['on']:.3f} s | "
                     f"{pct(c['paired_overhead']['load'])} | "
                     f"{c['record_s'] * 1e3:.1f} ms ({100 * c['record_s'] / s['off']:.1f}%) | "
                     f"{c['verify_s'] * 1e3:.1f} ms ({100 * c['verify_s'] / l_['off']:.1f}%) |")
    lines += ["", f"Medians of {cases[0]['rounds']} alternating rounds (overhead: median of the per-round ratios); 'alone': the integrity call timed by itself "
              "on the saved checkpoint (its share of the save / load without checksums; at load it runs in a "
              "thread beside the loader, so this is an upper bound on one core).", "",
              "| checksum | GB/s (one core) |", "|---|---|"]
    lines += [f"| {name} | {rate:.2f} |" for name, rate in rates.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.rounds, args.scratch)), flush=True)
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cases = []
    with tempfile.TemporaryDirectory(prefix="pma-integrity-") as scratch:
        rates = throughput(Path(scratch))
        for name in args.cases:
            proc = subprocess.run([sys.executable, __file__, "--case", name, "--rounds", str(args.rounds),
                                   "--scratch", str(Path(scratch) / name)], cwd=REPO, env=env,
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"case {name} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
            cases.append(json.loads(line[len("RESULT "):]))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    table = markdown(cases, rates, load)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{BASENAME}.json").write_text(json.dumps({"cases": cases, "throughput_gbps": rates,
                                                                    "uptime": load}, indent=2))
    (args.results_dir / f"{BASENAME}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
