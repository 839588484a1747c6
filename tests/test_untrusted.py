"""Untrusted checkpoints run no code: every command that reads a checkpoint refuses one whose pickles
name anything but what checkpoints are made of, naming the file, before torch or megatron-core
unpickles it; every legitimate checkpoint still passes.

Cost: one tiny 4-iteration training (checkpoints at 2 and 4), then pma-train, pma-merge, pma-eval and
pma-export on payloads, two at a time, each refused in its first seconds (plain processes, no process
group), and one legitimate merge; pma-train's other load paths are checked in-process.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pma_train.checkpoint import layout
from pma_train.checkpoint.layout import CheckpointError
from pma_train.checkpoint.safe_pickle import OBJECT_GLOBALS, UnsafePickleError, check_archive, check_pickle
from tests.launch import run_module, train
from tests.payloads import RunsCode, add_common_pt, copy_checkpoint, replace_entry, replace_metadata

TRAIN = ["train.iters=4", "checkpoint.interval=2", "train.log_interval=1", "train.eval_interval=100",
         "train.eval_iters=1", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
         "schedule.warmup_iters=1", "seed=5"]
FORBIDDEN = "posix.system"  # what os.system pickles as


def _craft(base: Path, good: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Each payload kind: (checkpoint, the file its refusal must name)."""
    out = {}
    ckpt = copy_checkpoint(good, base / "metadata" / "iter_0000004")
    replace_metadata(ckpt, marker)
    out["metadata"] = (ckpt, str(ckpt / ".metadata"))
    for kind, prefix in (("rng_state", "rng_state"), ("common_state", "common_state")):
        ckpt = copy_checkpoint(good, base / kind / "iter_0000004")
        key = replace_entry(ckpt, marker, prefix)
        out[kind] = (ckpt, f"{ckpt / '__0_0.distcp'} (entry {key} ")
    # Without pma-train's side-car, pma-merge's selection reads the common state (Megatron-LM's args).
    (out["common_state"][0] / "pma_train.json").unlink()
    ckpt = copy_checkpoint(good, base / "chunk" / "iter_0000004")
    key = replace_entry(ckpt, marker, tensor=True)
    out["chunk"] = (ckpt, f"{ckpt / '__0_0.distcp'} (entry {key} ")
    ckpt = copy_checkpoint(good, base / "common_pt" / "iter_0000004")
    add_common_pt(ckpt, marker)
    out["common_pt"] = (ckpt, str(ckpt / "common.pt"))
    for ckpt, _ in out.values():
        layout.write_tracker(ckpt.parent, 4)
    return out


def _commands(base: Path, root: Path, payloads: dict) -> dict[str, tuple[list[str], str]]:
    """Every command path that reads a checkpoint, each given one payload kind: (module args, the file
    its refusal must name)."""
    p = {kind: str(ckpt) for kind, (ckpt, _) in payloads.items()}
    named = {kind: text for kind, (_, text) in payloads.items()}
    train_args = ["pma_train.cli.train", "logging.progress_bar=false", *TRAIN]
    return {
        "train_load": ([*train_args, f"run.dir={base / 'r1'}", f"checkpoint.load={p['metadata']}"],
                       named["metadata"]),
        "merge": (["pma_train.cli.merge", "progress_bar=false", f"inputs=[{root / 'iter_0000002'},{p['common_state']}]",
                   f"output={base / 'merged-payload'}"], named["common_state"]),
        "eval": (["pma_train.cli.eval", "model=tiny", f"run.dir={base / 'e'}", f"checkpoints=[{p['chunk']}]"],
                 named["chunk"]),
        "export": (["pma_train.cli.export", "model=tiny", f"checkpoint={p['rng_state']}", f"output={base / 'hf'}"],
                   named["rng_state"]),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("untrusted")
    root = train(base / "run", TRAIN, nproc=1).run_dir / "checkpoints"
    marker = base / "code-ran"
    payloads = _craft(base / "payloads", root / "iter_0000004", marker)
    commands = _commands(base, root, payloads)
    legit = ["pma_train.cli.merge", "progress_bar=false", f"root={root}", "n=2", f"output={base / 'merged'}"]
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(run_module, args, None) for name, (args, _) in commands.items()}
        runs["legit_merge"] = pool.submit(run_module, legit, None)
        runs = {name: future.result() for name, future in runs.items()}
    return {"base": base, "root": root, "marker": marker, "payloads": payloads, "commands": commands, "runs": runs}


@pytest.mark.parametrize("command", ["train_load", "merge", "eval", "export"])
def test_command_refuses_payload_naming_the_file(work, command):
    proc = work["runs"][command]
    output = proc.stdout + proc.stderr
    named = work["commands"][command][1]
    assert proc.returncode != 0, output[-3000:]
    assert named in output and FORBIDDEN in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not work["marker"].exists(), "the payload ran"


def _job(checkpoint_dir: Path, **fields):
    from pma_train.config import JobConfig

    job = JobConfig()
    job.checkpoint.dir = str(checkpoint_dir)
    for name, value in fields.items():
        setattr(job.checkpoint, name, value)
    return job


def test_train_refuses_payload_to_init_from_auto_resume_and_init_merge(work, tmp_path):
    """pma-train's check before any process group (the CLI prints it as train_load's run shows)."""
    from pma_train.cli.train import check_checkpoints

    payloads = work["payloads"]
    init_root = tmp_path / "init_merge"  # PMA-init averages the last two: a good one and the payload
    copy_checkpoint(work["root"] / "iter_0000002", init_root / "iter_0000002")
    copy_checkpoint(payloads["common_pt"][0], init_root / "iter_0000004")
    cases = {
        "init_from": (_job(tmp_path / "none", init_from=str(payloads["rng_state"][0])), payloads["rng_state"][1]),
        "auto-resume": (_job(payloads["chunk"][0].parent), payloads["chunk"][1]),
        "init_merge": (_job(tmp_path / "none"), str(init_root / "iter_0000004" / "common.pt")),
    }
    cases["init_merge"][0].checkpoint.init_merge.root = str(init_root)
    cases["init_merge"][0].checkpoint.init_merge.n = 2
    for name, (job, named) in cases.items():
        with pytest.raises(CheckpointError) as err:
            check_checkpoints(job)
        assert named in str(err.value) and FORBIDDEN in str(err.value), (name, str(err.value))
    assert not work["marker"].exists()


def test_check_refuses_every_payload_kind_in_process(work):
    for kind, (ckpt, named) in work["payloads"].items():
        with pytest.raises(CheckpointError) as err:
            layout.check_loadable(ckpt.parent)
        assert named in str(err.value) and FORBIDDEN in str(err.value), (kind, str(err.value))
    from pma_train.merge.dcp_io import CheckpointIndex

    with pytest.raises(CheckpointError, match=FORBIDDEN):
        CheckpointIndex(work["payloads"]["metadata"][0])
    with pytest.raises(CheckpointError, match=FORBIDDEN):
        layout.is_gpt_checkpoint(work["payloads"]["metadata"][0])
    assert not work["marker"].exists()


def test_payloads_run_code_without_the_check(work, tmp_path):
    """The payloads are live: torch's DCP reader runs them, from .metadata and from a byte entry read
    the way megatron-core's load_common_state_dict reads its common state (a BytesIO destination:
    torch.load(weights_only=False))."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    ckpt = copy_checkpoint(work["root"] / "iter_0000002", tmp_path / "a")
    key = replace_entry(ckpt, marker, "common_state")
    dcp.load({key: io.BytesIO()}, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    assert marker.exists()
    marker.unlink()
    replace_metadata(ckpt, marker)
    with pytest.raises(Exception):
        dcp.FileSystemReader(str(ckpt)).read_metadata()
    assert marker.exists()


def test_legitimate_checkpoints_pass(work):
    proc = work["runs"]["legit_merge"]
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for ckpt in (work["root"] / "iter_0000002", work["root"] / "iter_0000004", work["base"] / "merged"):
        layout.check_loadable(ckpt)


def test_chunk_headers_are_read_through_the_same_allow_list(work):
    """dcp_io's header reader (merge, export) locates every chunk of a real checkpoint: no fallback."""
    from pma_train.merge.dcp_io import CheckpointIndex, ChunkReader

    index, reader = CheckpointIndex(work["root"] / "iter_0000004"), ChunkReader()
    try:
        assert all(reader._locate(chunk) is not None for entry in index.tensors.values() for chunk in entry.chunks)
    finally:
        reader.close()


def test_archives_torch_load_would_read_otherwise_are_refused(tmp_path):
    with pytest.raises(UnsafePickleError) as err:
        check_pickle(pickle.dumps(RunsCode(tmp_path / "x")), OBJECT_GLOBALS)
    assert err.value.global_name == FORBIDDEN
    cases = {"torchscript": {"a/data.pkl": pickle.dumps(1), "a/constants.pkl": pickle.dumps(())},
             "no data.pkl": {"a/other.pkl": pickle.dumps(1)}}
    for name, members in cases.items():
        blob = io.BytesIO()
        with zipfile.ZipFile(blob, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, data)
        _check_bytes(tmp_path / name, blob.getvalue(), raises=ValueError)
    legacy = io.BytesIO()
    torch.save(torch.ones(2), legacy, _use_new_zipfile_serialization=False)  # pre-1.6 format: plain pickles
    _check_bytes(tmp_path / "legacy", legacy.getvalue(), raises=ValueError)
    assert not (tmp_path / "x").exists()


def _check_bytes(path: Path, data: bytes, raises: type[Exception]) -> None:
    import os

    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(raises):
            check_archive(fd, 0, len(data), OBJECT_GLOBALS)
    finally:
        os.close(fd)
