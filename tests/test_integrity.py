"""Checksums: 64 flipped bytes inside a tensor of a real checkpoint (same file size) are refused by every
reader (pma-eval, pma-merge, pma-export, resume, pma-check), each naming checkpoint, file and tensor, and
merge / export publish nothing; a checkpoint without checksums still loads, with one warning; merge and
export outputs carry checksums that pma-check verifies.

Cost: one 2-iteration tiny run, then every command's process runs side by side (module fixture).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pma_train.checkpoint import integrity, layout
from pma_train.checkpoint.check import CheckConfig, run_check
from pma_train.checkpoint.readers import READERS_FILE
from tests.launch import REPO, test_env, train

SHAPE = ["train.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.eval_iters=1"]
TRAIN = SHAPE + ["train.iters=2", "train.log_interval=1", "train.eval_interval=100", "schedule.warmup_iters=1",
                 "checkpoint.interval=1", "seed=3"]


def flip_64_bytes(ckpt: Path, optimizer: bool) -> tuple[str, str]:
    """Invert 64 bytes in the middle of the largest model (or optimizer) tensor: the file keeps its size."""
    chunks = integrity.read_checksums(ckpt).chunks
    model = [e for e in chunks if e.key.startswith("decoder.") or e.key.startswith("embedding.")]
    entry = max([e for e in chunks if e.key.startswith("optimizer.")] if optimizer else model, key=lambda e: e.length)
    with open(ckpt / entry.path, "r+b") as f:
        f.seek(entry.offset + entry.length // 2)
        data = f.read(64)
        f.seek(entry.offset + entry.length // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return entry.key, entry.path


def _start(name: str, args: list[str], base: Path) -> tuple[subprocess.Popen, Path]:
    log = base / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=test_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    return proc, log


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    good = train(base / "good", TRAIN).run_dir / "checkpoints"
    copies = {}
    for name in ("bad_model", "bad_optimizer", "old"):
        shutil.copytree(good, base / name)
        copies[name] = base / name
    latest = layout.iter_dir_name(2)
    flipped = {"model": flip_64_bytes(copies["bad_model"] / latest, optimizer=False),
               "optimizer": flip_64_bytes(copies["bad_optimizer"] / latest, optimizer=True)}
    (copies["old"] / latest / integrity.SIDECAR).unlink()
    bad = copies["bad_model"]
    inputs = lambda root: f"inputs=[{root / layout.iter_dir_name(1)},{root / latest}]"  # noqa: E731
    resume = lambda root, name: ["-m", "pma_train.cli.train", f"run.dir={base / name}", f"checkpoint.dir={root}",  # noqa: E731
                                 "logging.progress_bar=false", *SHAPE, "train.iters=3"]
    eval_ = lambda ckpt, name: ["-m", "pma_train.cli.eval", f"checkpoints=[{ckpt}]", f"run.dir={base / name}", *SHAPE]  # noqa: E731
    export = lambda ckpt, out: ["-m", "pma_train.cli.export", f"checkpoint={ckpt}", "model=tiny", f"output={out}"]  # noqa: E731
    jobs = {
        "eval_bad": eval_(bad, "eval_bad"),
        "merge_bad": ["-m", "pma_train.cli.merge", "progress_bar=false", inputs(bad), f"output={base / 'merged_bad'}"],
        "export_bad": export(bad, base / "hf_bad"),
        "resume_bad_model": resume(bad, "resume_bad_model"),
        "resume_bad_optimizer": resume(copies["bad_optimizer"], "resume_bad_optimizer"),
        "eval_old": eval_(copies["old"], "eval_old"),
        "merge_good": ["-m", "pma_train.cli.merge", "progress_bar=false", inputs(good), f"output={base / 'merged'}"],
        "export_good": export(good, base / "hf"),
        "check_bad": ["-X", "importtime", "-m", "pma_train.cli.check", str(bad), "progress_bar=false"],
    }
    # Readers hold leases in <root>/.pma-readers (a lock file, created by the first); the checkpoints
    # themselves stay as they were.
    checkpoint_files = lambda: {p: p.stat().st_mtime_ns for p in bad.rglob("*") if p.name != READERS_FILE}  # noqa: E731
    before = checkpoint_files()
    started = {name: _start(name, args, base) for name, args in jobs.items()}
    done = {}
    for name, (proc, log) in started.items():
        proc.wait(timeout=600)
        done[name] = (proc.returncode, log.read_text())
    assert checkpoint_files() == before  # no reader touched the checkpoint
    return {"base": base, "good": good, "bad": bad, "flipped": flipped, "copies": copies, "done": done}


def _names_the_corruption(output: str, ckpt: Path, flipped: tuple[str, str]) -> bool:
    key, file = flipped
    return f"checksum mismatch: checkpoint {ckpt}, file {file}, tensor {key}" in output


@pytest.mark.parametrize("job", ["eval_bad", "merge_bad", "export_bad", "resume_bad_model", "check_bad"])
def test_every_reader_refuses_a_flipped_model_tensor(work, job):
    code, output = work["done"][job]
    assert code != 0, output[-3000:]
    assert _names_the_corruption(output, work["bad"] / layout.iter_dir_name(2), work["flipped"]["model"]), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_merge_and_export_publish_nothing(work):
    base = work["base"]
    assert layout.list_iterations(base / "merged_bad") == [] and layout.read_tracker(base / "merged_bad") is None
    assert not (base / "hf_bad").exists()
    assert not [p for p in base.iterdir() if p.name.startswith(".tmp")]


def test_a_flipped_optimizer_tensor_is_refused_on_resume(work):
    code, output = work["done"]["resume_bad_optimizer"]
    ckpt = work["copies"]["bad_optimizer"] / layout.iter_dir_name(2)
    assert code != 0 and _names_the_corruption(output, ckpt, work["flipped"]["optimizer"]), output[-3000:]
    assert work["flipped"]["optimizer"][0].startswith("optimizer.")
    assert layout.read_tracker(work["copies"]["bad_optimizer"]) == 2  # nothing saved over it


def test_a_checkpoint_without_checksums_loads_with_one_warning(work):
    code, output = work["done"]["eval_old"]
    assert code == 0, output[-3000:]
    assert output.count("carries no checksums") == 1, output[-3000:]
    assert "val loss" in output


def test_merge_and_export_outputs_carry_checksums_that_pma_check_verifies(work):
    base = work["base"]
    for name in ("merge_good", "export_good"):
        assert work["done"][name][0] == 0, work["done"][name][1][-3000:]
    merged = base / "merged" / layout.iter_dir_name(2)
    assert {e.path for e in integrity.read_checksums(merged).files} >= {".metadata"}
    assert integrity.read_checksums(base / "hf").files  # every file of the export, shards included
    reports = run_check(CheckConfig(path=str(base / "merged"), progress_bar=False))
    reports += run_check(CheckConfig(path=str(base / "hf"), progress_bar=False, workers=1))
    assert [r.status for r in reports] == ["ok", "ok"], reports
    assert any(r.path.name.endswith(".safetensors") or r.items > 1 for r in reports)


def test_pma_check_passes_a_good_root_and_names_a_truncated_file(work, tmp_path):
    reports = run_check(CheckConfig(path=str(work["good"]), progress_bar=False))
    assert [(r.path.name, r.status) for r in reports] == [("iter_0000001", "ok"), ("iter_0000002", "ok")]
    root = shutil.copytree(work["good"], tmp_path / "truncated")
    data = root / layout.iter_dir_name(1) / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    reports = run_check(CheckConfig(path=str(root), progress_bar=False))
    assert [r.status for r in reports] == ["BAD", "ok"]
    assert "data file __0_0.distcp is truncated" in reports[0].problems[0]


def test_pma_check_stays_off_megatron(work):
    code, output = work["done"]["check_bad"]
    assert "import time:" in output and "megatron" not in output
