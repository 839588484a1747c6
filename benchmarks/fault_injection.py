"""Fault injection: SIGKILL pma-train saves, pma-merge, pma-data and pma-export at seeded random
points, rerun, and check that nothing was half-published, every rerun finishes, and the results equal
an uninterrupted run bit for bit.

    python benchmarks/fault_injection.py                      # the full table (a few dozen kills)
    python benchmarks/fault_injection.py --quick              # what tests/test_fault_injection.py runs

Each kill hits the whole process group (torchrun, its ranks, any writer processes they spawned),
at a random delay either anywhere in the job or inside its write window (from the moment the job's
hidden temporary appears). Writes `fault_injection.{json,md}` to --results-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pma_train.checkpoint import layout  # noqa: E402
from pma_train.metrics import read_metrics  # noqa: E402
from pma_train.slurm_env import free_port  # noqa: E402

TRAIN = ["model=tiny", "train.iters=8", "checkpoint.interval=2", "train.log_interval=1", "train.eval_interval=100",
         "train.eval_iters=1", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
         "schedule.warmup_iters=1", "seed=5", "train.lr=1e-2", "logging.progress_bar=false"]


@dataclass
class Outcome:
    scenario: str
    kills: int = 0
    in_write_window: int = 0
    survived: int = 0  # rerun finished and equals the uninterrupted result bit for bit
    half_published: int = 0  # a visible (non-hidden) output that is incomplete after a kill
    data_lost: int = 0  # an output published before the kill that is gone or changed afterwards
    failures: list[str] = field(default_factory=list)

    def record(self, kill: int, problems: list[str], failure: str | None) -> None:
        """What the kill left (problems) and what its rerun found (failure): a survival, or a failure line."""
        if problems or failure:
            self.failures.append(f"kill {kill}: {'; '.join(problems + ([failure] if failure else []))}")
            self.data_lost += bool(failure and failure.startswith("lost"))
        else:
            self.survived += 1


def _env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled",
                "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONPATH": str(REPO)})
    return env


def _cmd(module: str, args: list[str], nproc: int | None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                f"--master-port={free_port()}"] if nproc else [sys.executable]
    return launcher + ["-m", module, *args]


def run(module: str, args: list[str], nproc: int | None = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(module, args, nproc), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def run_and_kill(module: str, args: list[str], nproc: int | None, window_of, delay: float,
                 in_window: bool) -> bool:
    """Start the job in its own process group and SIGKILL the group after `delay` seconds, counted
    from the start or (in_window) from when window_of() first holds. True if it was killed."""
    proc = subprocess.Popen(_cmd(module, args, nproc), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.perf_counter()
    try:
        if in_window:
            while not window_of() and proc.poll() is None and time.perf_counter() - start < 300:
                time.sleep(0.002)
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline and proc.poll() is None:
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        _reap_group(proc.pid)
    return killed


def longest_window(module: str, args: list[str], nproc: int | None, window_of) -> float:
    """Run the job to the end and return the longest time window_of() held (a save's write window)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(_cmd(module, args, nproc), cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    longest, opened = 0.0, None
    while proc.poll() is None:
        now, inside = time.perf_counter(), window_of()
        if inside and opened is None:
            opened = now
        elif not inside and opened is not None:
            longest, opened = max(longest, now - opened), None
        time.sleep(0.001)
    log.seek(0)
    output = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{output[-4000:]}")
    return longest


def _reap_group(pgid: int) -> None:
    # Ranks and writer processes share the group: none may outlive the kill.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tmp_exists(root: Path, prefix: str = layout.TMP_PREFIX) -> bool:
    return root.is_dir() and any(p.name.startswith(prefix) for p in root.iterdir())


def tensors_of(ckpt: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read whole with torch's own DCP tooling (an independent reader)."""
    out = scratch / f"{abs(hash(str(ckpt)))}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def same_tensors(a: dict, b: dict) -> str | None:
    if sorted(a) != sorted(b):
        return f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
    for key in a:
        if a[key].dtype != b[key].dtype or not torch.equal(a[key], b[key]):
            return f"tensor {key} differs"
    return None


def published_complete(root: Path) -> list[str]:
    """Problems with what a reader of root would see: every iter_* dir and `latest` complete."""
    problems = []
    for iteration in layout.list_iterations(root):
        try:
            layout.verify_complete(root / layout.iter_dir_name(iteration))
        except layout.CheckpointError as err:
            problems.append(str(err))
    try:
        latest = layout.read_tracker(root)
    except layout.CheckpointError as err:
        return problems + [str(err)]
    if latest is not None and not (root / layout.iter_dir_name(latest)).is_dir():
        problems.append(f"latest names {latest}, which does not exist")
    return problems


def train_losses(run_dir: Path) -> dict[int, float]:
    """The run's train-loss history (a resumed run's records replace those it logs again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}


# ----------------------------------------------------------------------------- scenarios


def kill_training(work: Path, rng: random.Random, kills: int, reference: dict) -> Outcome:
    outcome = Outcome("pma-train save")
    for k in range(kills):
        run_dir = work / f"train-kill-{k}"
        ckpts = run_dir / "checkpoints"
        in_window = k % 2 == 0
        delay = rng.uniform(0, reference["save_s"]) if in_window else rng.uniform(0.1, 0.8) * reference["wall_s"]
        window = lambda: _tmp_exists(ckpts)  # noqa: E731
        before = {}
        killed = run_and_kill("pma_train.cli.train", [f"run.dir={run_dir}", *TRAIN], 1, window, delay, in_window)
        outcome.kills += killed
        outcome.in_write_window += killed and in_window
        problems = published_complete(ckpts)
        outcome.half_published += bool(problems)
        for iteration in layout.list_iterations(ckpts):
            before[iteration] = tensors_of(ckpts / layout.iter_dir_name(iteration), work)
        failure = _rerun_and_compare_training(run_dir, reference, before, work)
        outcome.record(k, problems, failure)
    return outcome


def _rerun_and_compare_training(run_dir: Path, reference: dict, before: dict, scratch: Path) -> str | None:
    try:
        run("pma_train.cli.train", [f"run.dir={run_dir}", *TRAIN])
    except RuntimeError as err:
        return f"rerun failed: {str(err)[-300:]}"
    ckpts = run_dir / "checkpoints"
    for iteration, tensors in before.items():
        path = ckpts / layout.iter_dir_name(iteration)
        if not path.is_dir():
            return f"lost: checkpoint {iteration} published before the kill is gone"
    final = tensors_of(layout.resolve_checkpoint(ckpts), scratch)
    diff = same_tensors(final, reference["final"])
    if diff:
        return f"final checkpoint differs from the uninterrupted run: {diff}"
    losses = train_losses(run_dir)
    if losses != reference["losses"]:
        return f"train losses differ: {losses} vs {reference['losses']}"
    return None


def kill_merging(work: Path, rng: random.Random, kills: int, inputs_root: Path, reference: dict) -> Outcome:
    outcome = Outcome("pma-merge (2 ranks)")
    for k in range(kills):
        out = work / f"merge-kill-{k}"
        args = _merge_args(inputs_root, out)
        in_window = k % 2 == 0
        delay = rng.uniform(0, reference["merge_engine_s"] + 0.2) if in_window else rng.uniform(0.1, 0.8) * reference["merge_wall_s"]
        killed = run_and_kill("pma_train.cli.merge", args, 2, lambda: _tmp_exists(out), delay, in_window)
        outcome.kills += killed
        outcome.in_write_window += killed and in_window
        problems = published_complete(out)
        outcome.half_published += bool(problems)
        published = layout.list_iterations(out)
        try:
            run("pma_train.cli.merge", args + (["overwrite=true"] if published else []), nproc=2)
            diff = same_tensors(tensors_of(layout.resolve_checkpoint(out), work), reference["merged"])
            leftovers = [p.name for p in out.iterdir() if p.name.startswith(layout.TMP_PREFIX)]
            failure = diff or (f"temporaries left after the rerun: {leftovers}" if leftovers else None)
        except RuntimeError as err:
            failure = f"rerun failed: {str(err)[-300:]}"
        outcome.record(k, problems, failure)
    return outcome


def _merge_args(inputs_root: Path, out: Path) -> list[str]:
    return [f"root={inputs_root}", "n=3", "v_iterations=2", "method=wma", f"output={out}", "progress_bar=false"]


def kill_data(work: Path, rng: random.Random, kills: int, corpus: Path, reference: dict) -> Outcome:
    outcome = Outcome("pma-data (2 workers)")
    for k in range(kills):
        prefix = work / f"data-kill-{k}" / "corpus"
        prefix.parent.mkdir(parents=True)
        args = [f"inputs=[{corpus}]", f"output_prefix={prefix}", "workers=2", "progress_bar=false"]
        delay = rng.uniform(0.1, 0.8) * reference["data_wall_s"]
        killed = run_and_kill("pma_train.cli.data", args, None, lambda: True, delay, False)
        outcome.kills += killed
        visible = [p for p in (prefix.with_suffix(".bin"), prefix.with_suffix(".idx")) if p.exists()]
        half = len(visible) == 1 or (visible and not _same_files(prefix, reference["data_prefix"]))
        outcome.half_published += bool(half)
        try:
            run("pma_train.cli.data", args + (["overwrite=true"] if visible else []), nproc=None)
            failure = None if _same_files(prefix, reference["data_prefix"]) else "rerun output differs"
        except RuntimeError as err:
            failure = f"rerun failed: {str(err)[-300:]}"
        outcome.record(k, ["half-published"] if half else [], failure)
    return outcome


def _same_files(prefix: Path, reference: Path) -> bool:
    return all(prefix.with_suffix(s).is_file() and prefix.with_suffix(s).read_bytes() == reference.with_suffix(s).read_bytes()
               for s in (".bin", ".idx"))


def kill_export(work: Path, rng: random.Random, kills: int, ckpt: Path, reference: dict) -> Outcome:
    outcome = Outcome("pma-export")
    for k in range(kills):
        out = work / f"export-kill-{k}" / "hf"
        args = [f"checkpoint={ckpt}", "model=tiny", f"output={out}"]
        delay = rng.uniform(0.1, 0.8) * reference["export_wall_s"]
        killed = run_and_kill("pma_train.cli.export", args, None, lambda: True, delay, False)
        outcome.kills += killed
        half = out.exists() and _export_files(out) != reference["export_files"]
        outcome.half_published += bool(half)
        try:
            run("pma_train.cli.export", args + (["overwrite=true"] if out.exists() else []), nproc=None)
            failure = None if _export_files(out) == reference["export_files"] else "rerun output differs"
        except RuntimeError as err:
            failure = f"rerun failed: {str(err)[-300:]}"
        outcome.record(k, ["half-published"] if half else [], failure)
    return outcome


def _export_files(out: Path) -> dict[str, bytes]:
    # Provenance records timings (and checksums.json covers it); everything else must be byte-identical.
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".json") and p.name not in ("pma_export.json", "checksums.json")}


# ----------------------------------------------------------------------------- corruption


def _flip(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _stored_item(ckpt: Path, want) -> tuple[str, int, int]:
    """(file, offset, length) of the first stored item whose key satisfies want."""
    metadata = layout.read_metadata(ckpt)
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: kv[0].fqn):
        if want(index.fqn):
            return info.relative_path, info.offset, info.length
    raise LookupError(f"no stored item of that kind in {ckpt}")


def _corruptions(root: Path) -> dict[str, tuple[object, str]]:
    """kind -> (how to corrupt a copy of root, the file name the error must name)."""
    ckpt = layout.resolve_checkpoint(root)

    def in_item(want):
        def corrupt(r: Path) -> None:
            name, offset, length = _stored_item(ckpt, want)
            _flip(layout.resolve_checkpoint(r) / name, offset + length // 2, min(64, length // 4))
        return corrupt

    tensor = _stored_item(ckpt, lambda k: k.startswith("decoder.") and k.endswith(".weight"))[0]
    common = _stored_item(ckpt, lambda k: k.startswith("common_state"))[0]
    rng = _stored_item(ckpt, lambda k: k.startswith("rng_state"))[0]
    return {
        ".metadata": (lambda r: _flip(layout.resolve_checkpoint(r) / ".metadata", 200, 16), ".metadata"),
        "model tensor data (.distcp)": (in_item(lambda k: k.startswith("decoder.") and k.endswith(".weight")), tensor),
        "optimizer tensor data (.distcp)": (in_item(lambda k: k.startswith("optimizer.")), ".distcp"),
        "common state (.distcp byte entry)": (in_item(lambda k: k.startswith("common_state")), common),
        "rng state (.distcp byte entry)": (in_item(lambda k: k.startswith("rng_state")), rng),
        "pma_train.json (truncated)": (lambda r: _truncate(layout.resolve_checkpoint(r) / "pma_train.json"), "pma_train.json"),
        "checksums.json": (lambda r: _flip(layout.resolve_checkpoint(r) / "checksums.json", 40, 8), "checksums.json"),
        "tracker (not text)": (lambda r: (r / layout.TRACKER_FILE).write_bytes(b"\xff\xfe8\n"), layout.TRACKER_FILE),
    }


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_files(work: Path, root: Path) -> list[dict]:
    """Each kind of file corrupted in a copy of a run's checkpoints: pma-check must fail naming the file,
    and leave the files as they were (no repair, no deletion)."""
    import shutil

    rows = []
    for k, (kind, (corrupt, named)) in enumerate(_corruptions(root).items()):
        copy = work / f"corrupt-{k}"
        shutil.copytree(root, copy)
        corrupt(copy)
        before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        proc = subprocess.run(_cmd("pma_train.cli.check", [str(copy), "progress_bar=false"], None), cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        after = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
        lines = [line for line in output.splitlines() if named in line]
        rows.append({"kind": kind, "detected": proc.returncode == 1 and bool(lines),
                     "message": (lines[0].strip() if lines else output.strip()[-300:])[:300],
                     "untouched": before == after})
    return rows


# ----------------------------------------------------------------------------- references


def build_references(work: Path) -> dict:
    ref: dict = {}
    run_dir = work / "reference"
    ckpts = run_dir / "checkpoints"
    start = time.perf_counter()
    ref["save_s"] = longest_window("pma_train.cli.train", [f"run.dir={run_dir}", *TRAIN], 1, lambda: _tmp_exists(ckpts))
    ref["wall_s"] = time.perf_counter() - start
    ref["losses"] = train_losses(run_dir)
    ref["final"] = tensors_of(layout.resolve_checkpoint(ckpts), work)
    ref["ckpts"] = ckpts

    out = work / "reference-merge"
    start = time.perf_counter()
    run("pma_train.cli.merge", _merge_args(ckpts, out), nproc=2)
    ref["merge_wall_s"] = time.perf_counter() - start
    provenance = json.loads((layout.resolve_checkpoint(out) / "pma_merge.json").read_text())
    ref["merge_engine_s"] = provenance["summary"]["seconds"]
    ref["merged"] = tensors_of(layout.resolve_checkpoint(out), work)

    corpus = work / "corpus.txt"
    rng = random.Random(0)
    words = ["river", "stone", "lantern", "quiet", "harbour", "meadow", "copper", "willow"]
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 400)))
                                  for _ in range(4000)))
    prefix = work / "reference-data" / "corpus"
    prefix.parent.mkdir()
    start = time.perf_counter()
    run("pma_train.cli.data", [f"inputs=[{corpus}]", f"output_prefix={prefix}", "workers=2", "progress_bar=false"],
        nproc=None)
    ref["data_wall_s"], ref["data_prefix"], ref["corpus"] = time.perf_counter() - start, prefix, corpus

    out = work / "reference-export" / "hf"
    start = time.perf_counter()
    run("pma_train.cli.export", [f"checkpoint={layout.resolve_checkpoint(ckpts)}", "model=tiny", f"output={out}"],
        nproc=None)
    ref["export_wall_s"], ref["export_files"] = time.perf_counter() - start, _export_files(out)
    return ref


def markdown(outcomes: list[Outcome], corruptions: list[dict], seconds: float, seed: int) -> str:
    lines = [f"Fault injection (seed {seed}, {seconds:.0f} s, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", "",
             "| job | kills | in write window | survived (rerun equal) | half-published | data lost |",
             "|---|---:|---:|---:|---:|---:|"]
    for o in outcomes:
        lines.append(f"| {o.scenario} | {o.kills} | {o.in_write_window} | {o.survived} | {o.half_published} | {o.data_lost} |")
    failures = [f"- {o.scenario}: {f}" for o in outcomes for f in o.failures]
    lines += ["", "| corrupted | detected by pma-check | files left as they were | message |", "|---|---|---|---|"]
    lines += [f"| {c['kind']} | {'yes' if c['detected'] else 'NO'} | {'yes' if c['untouched'] else 'NO'} | "
              f"`{c['message']}` |" for c in corruptions]
    return "\n".join(lines + ([""] + failures if failures else [])) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-kills", type=int, default=12)
    parser.add_argument("--merge-kills", type=int, default=8)
    parser.add_argument("--data-kills", type=int, default=4)
    parser.add_argument("--export-kills", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="1 / 1 / 1 / 1 kills, each in its write window where it has one (the CI test)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick:
        args.train_kills, args.merge_kills, args.data_kills, args.export_kills = 1, 1, 1, 1
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pma-faults-") as tmp:
        work = Path(tmp)
        ref = build_references(work)
        outcomes = [kill_training(work, rng, args.train_kills, ref),
                    kill_merging(work, rng, args.merge_kills, ref["ckpts"], ref),
                    kill_data(work, rng, args.data_kills, ref["corpus"], ref),
                    kill_export(work, rng, args.export_kills, layout.resolve_checkpoint(ref["ckpts"]), ref)]
        corruptions = corrupt_files(work, ref["ckpts"])
    seconds = time.perf_counter() - start
    args.results_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(outcomes, corruptions, seconds, args.seed)
    (args.results_dir / "fault_injection.md").write_text(table)
    (args.results_dir / "fault_injection.json").write_text(json.dumps(
        {"seed": args.seed, "seconds": seconds, "outcomes": [asdict(o) for o in outcomes],
         "corruptions": corruptions}, indent=2))
    print(table)
    ok = all(o.survived == len_ for o, len_ in zip(outcomes, (args.train_kills, args.merge_kills, args.data_kills,
                                                               args.export_kills))) and not any(o.half_published or o.data_lost for o in outcomes) \
        and all(c["detected"] and c["untouched"] for c in corruptions)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
