"""pma-merge's lean path: start-up time and whole-process memory per rank (issue 15 item 4).

- wall time of a single-process `pma-merge ... dry_run=true` (median of 3), and what it imported;
- peak RSS (VmHWM: the whole process, imports included) of each rank of a real
  `torchrun --nproc-per-node 2 pma-merge`, its anonymous / file-backed split at exit, what it imported;
- for reference, VmHWM of a process that only does `import torch` (the floor of any merge rank).

Called by merge_throughput.py (`measure`), or alone on existing checkpoints (e.g. merge_throughput's
inputs kept with --keep-checkpoints):

    python benchmarks/merge_startup.py --root /tmp/pma-merge-bench/ckpts --n 10 --v-tokens 6553600
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20
WATCHED = ("torch", "megatron", "wandb", "transformers", "matplotlib", "numpy", "hydra")


def _status_bytes() -> dict:
    status = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"(VmHWM|RssAnon|RssFile):\s+(\d+) kB", status)}


def _smaps_bytes() -> dict:
    """Now (not peak): PSS charges each shared page to its sharers, USS counts only this process's own pages,
    so the shared-library pages that many ranks (or the page cache) share show apart from RSS."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return {}
    fields = {k: int(v) * 1024 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    out = {k: fields[k] for k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean",
                                  "Private_Dirty", "Anonymous") if k in fields}
    out["Uss"] = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return out


def _watched() -> list[str]:
    return sorted({m.split(".")[0] for m in sys.modules} & set(WATCHED))


def _report() -> None:
    # One write per line: the ranks share the pipe (print writes the newline separately).
    line = json.dumps({"rank": int(os.environ.get("RANK", "0")), **_status_bytes(), "smaps": _smaps_bytes(),
                       "imported": _watched()})
    os.write(1, f"RANK_PEAK {line}\n".encode())


def rank_entry(argv: list[str]) -> None:
    """torchrun target: run `argv[0]` as its command (python -m, or a script's path), then print this rank's memory."""
    atexit.register(_report)
    sys.argv = argv
    if argv[0].endswith(".py"):
        runpy.run_path(argv[0], run_name="__main__")
    else:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def rank_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    return _lines(proc, "RANK_PEAK")


def _lines(proc: subprocess.CompletedProcess, tag: str) -> list[dict]:
    return [json.loads(x[len(tag) + 1:]) for x in proc.stdout.splitlines() if x.startswith(tag + " ")]


def _timed(run, cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU seconds of the command): CPU time, unlike wall time, barely depends on the machine's load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    _, wall = run(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(run, torchrun: list[str], plain: list[str], merge_args: list[str], out: Path) -> dict:
    """`run(cmd) -> (proc, wall)`; torchrun: the launcher's argv for 2 ranks; plain: how the merge command
    starts alone (`pma-merge`, or python -m pma_train.cli.merge); merge_args: a merge into `out`."""
    dry, dry_cpu = zip(*(_timed(run, plain + merge_args + ["dry_run=true"]) for _ in range(3)))
    listed, _ = run([sys.executable, __file__, "_rank", "pma_train.cli.merge", *merge_args, "dry_run=true"])
    proc, wall = run(torchrun + [__file__, "_rank", "pma_train.cli.merge", *merge_args])
    shutil.rmtree(out, ignore_errors=True)
    proc_torch, _ = run([sys.executable, __file__, "_torch_only"])
    steps, _ = run([sys.executable, __file__, "_import_steps"])
    return {"dry_run_s": dry, "dry_run_s_median": statistics.median(dry),
            "dry_run_cpu_s_median": statistics.median(dry_cpu),
            "dry_run_imported": _lines(listed, "RANK_PEAK")[0]["imported"], "torchrun_2_wall_s": wall,
            "ranks": sorted(_lines(proc, "RANK_PEAK"), key=lambda r: r["rank"]),
            "import_torch_only": _lines(proc_torch, "RANK_PEAK")[0], "import_steps": _lines(steps, "IMPORT_STEP"),
            "torch_mappings": _lines(proc_torch, "MAPPINGS")[0],
            "loadavg": list(os.getloadavg())}


# What a merge rank imports, in order: the memory each step adds shows what besides torch could go.
IMPORT_STEPS = (("torch",), ("numpy",), ("torch.distributed",), ("torch.distributed.checkpoint",),
                ("omegaconf", "hydra"), ("pma_train.cli.merge",), ("pma_train.merge.engine",))


def _mappings(top: int = 10) -> list[dict]:
    """This process's resident memory by mapping (a library's file name, [heap], [anon]), largest first."""
    rss: dict[str, int] = {}
    private: dict[str, int] = {}
    name = "?"
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
        elif line.startswith(("Rss:", "Private_Dirty:", "Private_Clean:")):
            target = rss if line.startswith("Rss:") else private
            target[name] = target.get(name, 0) + int(line.split()[1]) * 1024
    return [{"mapping": k, "rss": v, "private": private.get(k, 0)}
            for k, v in sorted(rss.items(), key=lambda kv: -kv[1])[:top]]


def import_steps() -> None:
    import importlib

    _step("python")
    for modules in IMPORT_STEPS:
        for name in modules:
            importlib.import_module(name)
        _step(" + ".join(modules))


def _step(label: str) -> None:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    os.write(1, f"IMPORT_STEP {json.dumps({'step': label, 'rss': rss, 'modules': len(sys.modules), **_smaps_bytes()})}\n".encode())


def markdown_lines(lean: dict) -> list[str]:
    ranks = lean["ranks"]
    peak = max(r["VmHWM"] for r in ranks)
    per_rank = ", ".join(f"{r['VmHWM'] / MiB:.0f}" for r in ranks)
    torch_only = lean["import_torch_only"]["VmHWM"]
    return ["## Lean path: start-up and whole-process memory", "",
            f"`pma-merge ... dry_run=true`, one process: {lean['dry_run_s_median']:.2f} s wall (median of 3; "
            f"goal < 1.5 s; {lean['dry_run_cpu_s_median']:.2f} s CPU), imported "
            f"{', '.join(lean['dry_run_imported']) or 'none'} of {', '.join(WATCHED)}. "
            f"`torchrun --nproc-per-node 2 pma-merge`: {lean['torchrun_2_wall_s']:.1f} s wall; peak RSS per rank "
            f"(VmHWM, whole process) {per_rank} MiB (goal <= 300 MiB; "
            f"at exit anonymous {max(r['RssAnon'] for r in ranks) / MiB:.0f} MiB, file-backed "
            f"{max(r['RssFile'] for r in ranks) / MiB:.0f} MiB), imported {', '.join(ranks[0]['imported'])}. "
            f"A process that only imports torch peaks at {torch_only / MiB:.0f} MiB, "
            f"{torch_only / peak:.0%} of a rank's peak. Load average {lean['loadavg'][0]:.1f}.", ""] + _memory_tables(lean)


def _memory_tables(lean: dict) -> list[str]:
    lines = ["Memory of each rank at exit, from /proc/<pid>/smaps_rollup (MiB; PSS charges each shared page to "
             "its sharers, USS counts only the rank's private pages; VmHWM is the peak RSS):", "",
             "| process | VmHWM (peak RSS) | RSS at exit | PSS | PSS anon | PSS file | USS | shared clean |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(f"pma-merge rank {r['rank']}", r) for r in lean["ranks"]] + [("`import torch` only", lean["import_torch_only"])]
    for label, r in rows:
        m = r.get("smaps", {})
        cells = [m.get(k, 0) / MiB for k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Uss", "Shared_Clean")]
        lines.append(f"| {label} | {r['VmHWM'] / MiB:.0f} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    steps = lean.get("import_steps") or []
    if steps:
        lines += ["", "What each import adds (one process, in a merge rank's order; MiB after the step, and its increase):", "",
                  "| after importing | RSS | +RSS | USS | +USS | PSS | modules loaded |", "|---|---|---|---|---|---|---|"]
        for prev, step in zip([None] + steps[:-1], steps):
            d_rss = (step["rss"] - prev["rss"]) / MiB if prev else 0
            d_uss = (step["Uss"] - prev["Uss"]) / MiB if prev else 0
            lines.append(f"| {step['step']} | {step['rss'] / MiB:.0f} | {d_rss:+.0f} | {step['Uss'] / MiB:.0f} | "
                         f"{d_uss:+.0f} | {step['Pss'] / MiB:.0f} | {step['modules']} |")
    if lean.get("torch_mappings"):
        lines += ["", "Resident memory of a process that only imported torch, by mapping (MiB; *private* = its own "
                  "pages, the rest are file pages shared with every other process using that library):", "",
                  "| mapping | RSS | private |", "|---|---|---|"]
        lines += [f"| {m['mapping']} | {m['rss'] / MiB:.0f} | {m['private'] / MiB:.0f} |" for m in lean["torch_mappings"]]
    return lines + [""]


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--v-tokens", type=int)
    p.add_argument("--budget-mb", type=int, default=256)
    p.add_argument("--out", default="/tmp/pma-merge-startup-out")
    a = p.parse_args()
    merge_args = ["progress_bar=false", f"root={a.root}", f"n={a.n}", f"memory_budget_mb={a.budget_mb}",
                  f"output={a.out}"] + ([f"v_tokens={a.v_tokens}"] if a.v_tokens else [])
    from pma_train.slurm_env import free_port  # here: the ranks import this file, and only pma-merge's imports

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
    lean = measure(_run, torchrun, [sys.executable, "-m", "pma_train.cli.merge"], merge_args, Path(a.out))
    print(json.dumps(lean, indent=1))
    print("\n".join(markdown_lines(lean)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_rank":
        rank_entry(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_import_steps":
        import_steps()
    elif len(sys.argv) > 1 and sys.argv[1] == "_torch_only":
        import torch  # noqa: F401

        os.write(1, f"MAPPINGS {json.dumps(_mappings())}\n".encode())
        _report()
    else:
        main()
