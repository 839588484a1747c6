"""The lean paths: pma-merge and pma-check import torch and pma_train's merge / checkpoint packages only,
never the trainer's stack (megatron-core, wandb, transformers, matplotlib) nor deepspeed, also for a Megatron-LM
checkpoint whose tokens are read from its common state; a dry run of pma-merge from side-cars does
not even import torch; `pma-merge --help` lists merge options only.

Cost: four fresh interpreters (two import torch) on tiny torch DCP checkpoints; no training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter, save

from pma_train.checkpoint import layout
from tests.launch import REPO, test_env

HEAVY = {"megatron", "wandb", "transformers", "matplotlib", "deepspeed"}

# Runs a module as its command would, then lists the top-level packages the process imported.
RUN_AND_LIST = """
import runpy, sys
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print("MODULES " + " ".join(sorted({m.split('.')[0] for m in sys.modules})))
"""


def run_listing(module: str, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST, module, *args], cwd=REPO, env=test_env(),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, set(lines[0].split()[1:])


def write_checkpoint(ckpt, iteration: int, sidecar: bool) -> None:
    """A tiny torch_dist checkpoint: with pma-train's side-car, or as megatron-core writes one without
    it (metadata.json, the run's args in the `common_state` byte entry)."""
    state = {"layer.weight": torch.full((8, 8), float(iteration))}
    if not sidecar:  # megatron-core's ShardedObject: one byte entry holding torch.save([common state])
        args = argparse.Namespace(consumed_train_samples=8 * iteration, seq_length=16)
        state["common_state/shard_0_1"] = [{"iteration": iteration, "args": args}]
    ckpt.mkdir(parents=True)
    save(state, storage_writer=FileSystemWriter(str(ckpt)), planner=DefaultSavePlanner(flatten_state_dict=False),
         no_dist=True)
    if sidecar:
        (ckpt / layout.TRAIN_STATE_SIDECAR).write_text(json.dumps({"iteration": iteration,
                                                                   "consumed_tokens": 100 * iteration}))
    else:
        (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                        "common_backend": "torch", "common_backend_version": 1}))


def test_merge_and_check_import_no_trainer_stack(tmp_path):
    ours, megatron_lm = tmp_path / "ours", tmp_path / "megatron-lm"
    for it in (1, 2):
        write_checkpoint(ours / layout.iter_dir_name(it), it, sidecar=True)
        write_checkpoint(megatron_lm / layout.iter_dir_name(it), it, sidecar=False)

    proc, modules = run_listing("pma_train.cli.merge", f"root={ours}", "n=2", "v_tokens=100", "dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "200" in proc.stdout and str(ours / "iter_0000002") in proc.stdout
    assert not modules & (HEAVY | {"torch"}), modules

    out = tmp_path / "merged"
    proc, modules = run_listing("pma_train.cli.merge", "progress_bar=false", f"root={megatron_lm}", "n=2",
                                "v_tokens=128", f"output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "256" in proc.stdout and layout.list_iterations(out) == [2]  # tokens from the common state
    assert "torch" in modules and not modules & HEAVY, modules

    proc, modules = run_listing("pma_train.cli.check", str(out), "progress_bar=false")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not modules & HEAVY, modules


def test_merge_help_lists_merge_options_only():
    proc, modules = run_listing("pma_train.cli.merge", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory_budget_mb" in proc.stdout and "v_tokens" in proc.stdout
    for trainer_only in ("Configuration groups", "model:", "schedule:", "dense_8b", "wsd", "job_schema"):
        assert trainer_only not in proc.stdout, trainer_only
    assert not modules & (HEAVY | {"torch"}), modules
