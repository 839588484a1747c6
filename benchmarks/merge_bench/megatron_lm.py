"""pma-merge next to Megatron-LM's own merge tool, on the same inputs, with a warm and a cold page cache.

The reference is `tools/checkpoint/weighted_merge.py` of Megatron-LM pull request #5114. It is not part of
pma-train and is not copied into it: the benchmark takes the path of a Megatron-LM checkout that has it
(`--megatron-lm DIR`); the tool puts that checkout first on sys.path, so it runs with the megatron-core of
its own tree (torch and the rest from the interpreter given by `--megatron-python`, default this one).

That tool reads the layout of megatron-core before 0.19 (the common state in `common.pt`) and refuses any
byte entry outside the model (0.19's `common_state`, and `rng_state`). So both tools merge a copy of the
benchmark's checkpoints in that layout (`legacy_copy`): the .distcp files hard-linked (the same bytes and
page-cache pages), .metadata without those entries, the common state in common.pt, checksums.json
re-recorded for the new .metadata. pma-merge reads that layout as it reads Megatron-LM's own checkpoints.

Cold cache: /proc/sys/vm/drop_caches needs root, so every input file's clean pages are dropped with
posix_fadvise(POSIX_FADV_DONTNEED) (after fdatasync, so none is dirty); `resident_bytes` (mincore)
checks that they left. Only this machine's page cache is dropped: a hypervisor's cache under a virtual
disk may still serve the reads, which the cold raw read shows.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import pickle
import re
import shutil
import sys
from pathlib import Path

import merge_startup  # benchmarks/: runs a command on a rank and reports its memory at exit
from merge_bench.common import MiB, median, read_all, run, torchrun

LEGACY_DROPPED = ("common_state", "rng_state")  # byte entries weighted_merge.py refuses
TOOL = Path("tools/checkpoint/weighted_merge.py")


# ----------------------------------------------------------------------------- inputs in the older layout


def legacy_copy(src_root: Path, dst_root: Path, n: int) -> Path:
    """The newest n checkpoints of src_root in megatron-core's pre-0.19 layout, sharing their .distcp files."""
    import torch

    from pma_train.checkpoint import integrity

    dirs = sorted(p for p in src_root.iterdir() if p.name.startswith("iter_"))[-n:]
    shutil.rmtree(dst_root, ignore_errors=True)
    dst_root.mkdir(parents=True)
    for src in dirs:
        dst = dst_root / src.name
        dst.mkdir()
        for f in src.iterdir():
            if f.suffix == ".distcp":
                os.link(f, dst / f.name)
            elif f.name not in (".metadata", integrity.SIDECAR):
                shutil.copy2(f, dst / f.name)
        metadata = _read_dcp_metadata(src)
        common = None
        for index, info in list(metadata.storage_data.items()):
            if index.fqn.split("/")[0] == "common_state":
                fd = os.open(src / info.relative_path, os.O_RDONLY)
                try:
                    common = torch.load(io.BytesIO(os.pread(fd, info.length, info.offset)), weights_only=False)
                finally:
                    os.close(fd)
            if index.fqn.split("/")[0] in LEGACY_DROPPED:
                del metadata.storage_data[index]
        for key in [k for k in metadata.state_dict_metadata if k.split("/")[0] in LEGACY_DROPPED]:
            del metadata.state_dict_metadata[key]
        if common is None:
            raise RuntimeError(f"{src}: no common_state entry to move into common.pt")
        torch.save(common[0] if isinstance(common, list) else common, dst / "common.pt")
        (dst / ".metadata").write_bytes(pickle.dumps(metadata))
        _rerecord_checksums(src, dst)
    (dst_root / "latest_checkpointed_iteration.txt").write_text(str(int(dirs[-1].name.split("_")[1])))
    return dst_root


def _read_dcp_metadata(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt)).read_metadata()  # the benchmark's own files: plain unpickling is fine


def _rerecord_checksums(src: Path, dst: Path) -> None:
    """The chunk records still stored, and fresh records of the rewritten metadata files."""
    from pma_train.checkpoint import integrity

    old = integrity.read_checksums(src)
    kept = {(path, offset) for path, offset, _, _ in integrity.storage_items(dst)}
    integrity.write_checksums(dst, integrity.Checksums(
        old.algorithm, [e for e in old.chunks if (e.path, e.offset) in kept],
        integrity.file_entries(dst, [f for f in integrity.METADATA_FILES if (dst / f).is_file()])))


# ----------------------------------------------------------------------------- the page cache


def evict(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[Path]) -> int:
    """Bytes of these files in the page cache (mincore over a read-only mapping, like util-linux's fincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page, total = mmap.PAGESIZE, 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            try:
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {path}")
            finally:
                libc.munmap(addr, size)
            total += sum(b & 1 for b in vec) * page
        finally:
            os.close(fd)
    return min(total, sum(p.stat().st_size for p in files))


# ----------------------------------------------------------------------------- the two commands


def ours(root: Path, out: Path, merge_args: list[str]) -> list[str]:
    """torchrun, 2 ranks: pma-merge, each rank reporting its memory at exit."""
    return torchrun(2) + [merge_startup.__file__, "_rank", "pma_train.cli.merge", *merge_args]


def theirs(checkout: Path, python: str, inputs: list[Path], out: Path) -> list[str]:
    """torchrun, 2 ranks: weighted_merge.py with equal weights (the SMA), manual mode."""
    weight = repr(1.0 / len(inputs))
    launcher = [python] + torchrun(2)[1:]
    return launcher + [merge_startup.__file__, "_rank", str(checkout / TOOL), "--merge-inputs",
                       *(f"{p}:{weight}" for p in inputs), "--normalize", "--merge-output", str(out)]


def parse_theirs(stdout: str) -> dict:
    """The tool's own timing line (seconds) and its per-rank host peak."""
    timing = dict((k, float(v)) for k, v in re.findall(r"(\w+)=([\d.]+)s", _line(stdout, "Timing:")))
    return {"timing_s": timing, "stdout_lines": [x for x in stdout.splitlines()
                                                   if x.startswith(("Merge complete", "Timing", "I/O", "Memory"))]}


def _line(stdout: str, prefix: str) -> str:
    return next((x for x in stdout.splitlines() if x.startswith(prefix)), "")


def compare(checkout: Path, python: str, ckpt_root: Path, work: Path, n: int, merge_args, rounds: int, log) -> dict:
    """Rounds of (ours, theirs) with a warm cache, in alternating order, then one cold run of each."""
    if not (checkout / TOOL).is_file():
        raise FileNotFoundError(f"{checkout / TOOL} not found: --megatron-lm must be a Megatron-LM checkout "
                                "with pull request #5114's tools/checkpoint/weighted_merge.py")
    legacy = legacy_copy(ckpt_root, work / "legacy", n)
    inputs = sorted(p for p in legacy.iterdir() if p.name.startswith("iter_"))
    files = [f for d in inputs for f in sorted(d.iterdir()) if f.is_file()]
    data_files = [f for f in files if f.suffix == ".distcp"]
    our_out, their_out = work / "ours-out", work / "theirs-out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    args = merge_args(legacy, our_out)
    commands = {"pma-merge": lambda: ours(legacy, our_out, args),
                "weighted_merge.py": lambda: theirs(checkout, python, inputs, their_out)}
    runs = []

    def one(name: str, cache: str, keep: Path | None = None) -> dict:
        proc, wall = run(commands[name](), env=env, timeout=1200)
        if keep is not None:
            (our_out if name == "pma-merge" else their_out).rename(keep)
        row = {"tool": name, "cache": cache, "wall_s": wall,
               "ranks": sorted(merge_startup.rank_lines(proc), key=lambda r: r["rank"])}
        if name == "weighted_merge.py":
            row.update(parse_theirs(proc.stdout))
        else:
            row["stdout_lines"] = [_line(proc.stdout, "merged ")]
        shutil.rmtree(our_out, ignore_errors=True)
        shutil.rmtree(their_out, ignore_errors=True)
        runs.append(row)
        log(f"compare ({cache} cache): {name}: wall {wall:.1f} s, peak RSS per rank "
            f"{[round(r['VmHWM'] / MiB) for r in row['ranks']]} MiB")
        return row

    kept = {name: work / f"kept-{i}" for i, name in enumerate(commands)}
    for round_ in range(rounds):
        for name in (list(commands) if round_ % 2 == 0 else list(commands)[::-1]):
            read_all(files)
            one(name, "warm", kept[name] if round_ == 0 else None)
    agreement = max_abs_difference(next(kept["pma-merge"].glob("iter_*")), kept["weighted_merge.py"])
    log(f"compare: the two merged checkpoints differ by at most {agreement['max_abs_diff']:.3g} "
        f"over {agreement['tensors']} tensors")
    for path in kept.values():
        shutil.rmtree(path, ignore_errors=True)
    cold = {"resident_before_evict": resident_bytes(data_files)}
    read_all(files)
    cold["raw_read_warm_s"] = read_all(data_files)[1]
    evict(files)
    cold["resident_after_evict"] = resident_bytes(data_files)
    cold["raw_read_cold_s"] = read_all(data_files)[1]
    for name in commands:
        evict(files)
        cold.setdefault("resident_before_run", {})[name] = resident_bytes(data_files)
        one(name, "cold")
    cold["data_bytes"] = sum(f.stat().st_size for f in data_files)
    shutil.rmtree(legacy, ignore_errors=True)
    return {"checkout": str(checkout), "python": python, "python_version": sys.version.split()[0],
            "inputs": [str(p) for p in inputs], "runs": runs, "cold": cold, "agreement": agreement}


def max_abs_difference(ours_dir: Path, theirs_dir: Path) -> dict:
    """Both merged checkpoints loaded whole (torch's own DCP reader): the largest elementwise difference."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    states = []
    for path in (ours_dir, theirs_dir):
        tmp = path.parent / f"{path.name}.pt"
        dcp_to_torch_save(str(path), str(tmp))
        state = torch.load(tmp, weights_only=False)
        tmp.unlink()
        states.append({k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()})
    ours_t, theirs_t = states
    if set(ours_t) != set(theirs_t):
        raise RuntimeError(f"the merged checkpoints hold different tensors: {sorted(set(ours_t) ^ set(theirs_t))[:5]}")
    worst = max((float((ours_t[k].float() - theirs_t[k].float()).abs().max()) for k in ours_t), default=0.0)
    return {"tensors": len(ours_t), "max_abs_diff": worst,
            "dtypes": sorted({str(t.dtype) for t in ours_t.values()} | {str(t.dtype) for t in theirs_t.values()})}


# ----------------------------------------------------------------------------- report


def summary(cmp: dict) -> dict:
    """Per tool: median warm wall, cold wall, and the largest peak RSS (VmHWM) of a rank."""
    out = {}
    for tool in ("pma-merge", "weighted_merge.py"):
        warm = [r for r in cmp["runs"] if r["tool"] == tool and r["cache"] == "warm"]
        cold = [r for r in cmp["runs"] if r["tool"] == tool and r["cache"] == "cold"]
        walls = sorted(r["wall_s"] for r in warm)
        out[tool] = {"warm_wall_s": median(walls), "warm_walls_s": walls, "cold_wall_s": cold[0]["wall_s"] if cold else None,
                     "peak_rss": max(x["VmHWM"] for r in warm + cold for x in r["ranks"]),
                     "uss_at_exit": max(x.get("smaps", {}).get("Uss", 0) for r in warm + cold for x in r["ranks"])}
    return out


def markdown_lines(cmp: dict) -> list[str]:
    s = summary(cmp)
    ours_s, theirs_s = s["pma-merge"], s["weighted_merge.py"]
    cold = cmp["cold"]
    gb = cold["data_bytes"] / 1e9
    agree = cmp["agreement"]
    lines = ["## pma-merge vs Megatron-LM's weighted_merge.py (same inputs)", "",
             f"Megatron-LM pull request #5114's `tools/checkpoint/weighted_merge.py`, run from `{cmp['checkout']}` (a "
             f"checkout outside pma-train, with the megatron-core of its own tree; Python {cmp['python_version']}), and "
             f"`pma-merge`, each as `torchrun --nproc-per-node 2`, OMP_NUM_THREADS=1, the SMA of the same "
             f"{len(cmp['inputs'])} checkpoints ({gb:.2f} GB of .distcp files), memory budget 256 MiB for pma-merge. "
             "The inputs are the benchmark's checkpoints in megatron-core's pre-0.19 layout (common.pt; the .distcp "
             "files hard-linked, not copied: see `merge_bench/megatron_lm.py`), which weighted_merge.py requires; "
             f"{len([r for r in cmp['runs'] if r['cache'] == 'warm']) // 2} warm round(s) in alternating order, then "
             f"one cold run each. The two results differ by at most {agree['max_abs_diff']:.3g} ({agree['tensors']} "
             f"tensors, {', '.join(agree['dtypes'])}).", "",
             "| | pma-merge | weighted_merge.py | ratio (ours / theirs) |", "|---|---|---|---|",
             f"| whole command wall, warm cache (median) | {ours_s['warm_wall_s']:.1f} s | {theirs_s['warm_wall_s']:.1f} s | "
             f"{ours_s['warm_wall_s'] / theirs_s['warm_wall_s']:.2f} (goal <= 0.5) |",
             f"| whole command wall, cold cache | {ours_s['cold_wall_s']:.1f} s | {theirs_s['cold_wall_s']:.1f} s | "
             f"{ours_s['cold_wall_s'] / theirs_s['cold_wall_s']:.2f} |",
             f"| peak RSS of the busiest rank (VmHWM, whole process) | {ours_s['peak_rss'] / MiB:.0f} MiB | "
             f"{theirs_s['peak_rss'] / MiB:.0f} MiB | {ours_s['peak_rss'] / theirs_s['peak_rss']:.2f} |",
             f"| USS of the busiest rank at exit | {ours_s['uss_at_exit'] / MiB:.0f} MiB | "
             f"{theirs_s['uss_at_exit'] / MiB:.0f} MiB | |", "",
             "| run | cache | wall s | peak RSS per rank MiB | the tool's own summary |", "|---|---|---|---|---|"]
    for r in cmp["runs"]:
        own = "; ".join(x for x in r.get("stdout_lines", []) if x.startswith(("merged", "Timing")))
        lines.append(f"| {r['tool']} | {r['cache']} | {r['wall_s']:.1f} | "
                     f"{', '.join(str(round(x['VmHWM'] / MiB)) for x in r['ranks'])} | {own} |")
    lines += ["", f"Cold cache: the inputs' clean pages dropped with posix_fadvise(DONTNEED) before each cold run "
              f"(/proc/sys/vm/drop_caches needs root); resident bytes of the .distcp files (mincore): "
              f"{cold['resident_before_evict'] / MiB:.0f} MiB before, {cold['resident_after_evict'] / MiB:.0f} MiB after "
              f"eviction, at the start of the cold runs "
              f"{', '.join(f'{k} {v / MiB:.0f} MiB' for k, v in cold['resident_before_run'].items())}. Raw read of the "
              f"same files (16 MiB preadv, one process): warm {gb / cold['raw_read_warm_s']:.2f} GB/s, cold "
              f"{gb / cold['raw_read_cold_s']:.2f} GB/s ({cold['raw_read_cold_s']:.2f} s). Only this machine's page "
              "cache is dropped: the virtual disk's host may still cache the file.", ""]
    return lines
