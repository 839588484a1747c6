"""launch/: torchrun.sh and slurm.sbatch start real ranks, hydra sweeps give every job its own output,
and Slurm's variables stand in for torchrun's when submitit / srun start the ranks themselves."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pma_train.metrics import METRICS_FILE, read_metrics
from pma_train.slurm_env import first_slurm_host, torch_env_from_slurm
from tests.launch import REPO, free_port, test_env

VENV_BIN = str(Path(sys.executable).parent)
TINY = ["model=tiny", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=64",
        "train.log_interval=1", "train.eval_iters=1", "logging.progress_bar=false"]
# A run name that only arrives intact if every layer passes "$@" on: a space, a comma (a sweep to hydra
# when unquoted), $HOME (expanded by an eval) and double quotes inside hydra's single quotes.
NAME = 'tiny run: a,b $HOME "x"'
NAME_OVERRIDE = f"run.name='{NAME}'"

# srun for tests: start the command once per task on this machine, with the variables of a Slurm step.
FAKE_SRUN = r"""#!/usr/bin/env bash
set -u
nodes=${SLURM_NNODES:-1} per_node=1
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in
        --nodes=*) nodes=${1#*=} ;;
        --ntasks-per-node=*) per_node=${1#*=} ;;
    esac
    shift
done
ntasks=$((nodes * per_node)) pids=()
for ((task = 0; task < ntasks; task++)); do
    SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$ntasks SLURM_NTASKS=$ntasks SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \
    SLURM_PROCID=$task SLURM_NODEID=$((task / per_node)) SLURM_LOCALID=$((task % per_node)) "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# `python` for torchrun.sh that records what it would have run, one file per node.
RECORDING_PYTHON = r"""#!/usr/bin/env bash
{ echo "NODE_RANK=${NODE_RANK:-}"; printf '%s\n' "$@"; } > "$RECORD_DIR/node-$SLURM_NODEID.txt"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] && printf 'gpu-a\ngpu-b\n'
"""


def _script(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def _env(cache: Path, bin_dir: Path | None = None, **extra: str) -> dict:
    env = test_env(cache)
    for key in list(env):
        if key.startswith("SLURM_") or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                               "NNODES", "NODE_RANK", "NPROC_PER_NODE", "GPUS_PER_NODE",
                                               "CUDA_VISIBLE_DEVICES", "PYTHON"):
            del env[key]
    env["PATH"] = os.pathsep.join(([str(bin_dir)] if bin_dir else []) + [VENV_BIN, env.get("PATH", "/usr/bin:/bin")])
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict, cwd: Path = REPO, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run a launcher; on a timeout kill its whole process group (ranks included) rather than leave them."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd[:2]} timed out:\n{out[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args[:3]} failed ({proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


def _train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / METRICS_FILE, "train")}


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, cache):
    """launch/torchrun.sh, one node, 2 ranks (TP=2), checkpoints at iterations 1, 2, 3."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    out = _ok(_run(["bash", "launch/torchrun.sh", *TINY, "parallel.tp=2", "train.iters=3", "checkpoint.interval=1",
                    "train.eval_interval=3", f"run.dir={run_dir}", NAME_OVERRIDE],
                   _env(cache, NPROC_PER_NODE="2")))
    return run_dir, out


def test_torchrun_script_runs_two_ranks_and_passes_overrides_unchanged(tp2_run):
    run_dir, out = tp2_run
    assert "2 process(es) per node, rendezvous standalone" in out
    assert "world 2 = tp 2 x pp 1 x dp 1" in out
    losses = _train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.run.name == NAME and saved.parallel.tp == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == [
        "iter_0000001", "iter_0000002", "iter_0000003"]


def test_sbatch_runs_two_nodes_through_srun_and_torchrun(tmp_path, cache):
    """slurm.sbatch as Slurm would run it on the first node; srun starts one torchrun per "node"
    (both on this machine), which meet in torchrun's multi-node rendezvous: 2 nodes x 1 rank, DP=2."""
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "srun", FAKE_SRUN)
    run_dir = tmp_path / "run"
    env = _env(cache, bin_dir, SLURM_JOB_ID="4242", SLURM_JOB_NAME="pma-train", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="127.0.0.[1-2]", MASTER_PORT=str(free_port()))
    out = _ok(_run(["bash", str(REPO / "launch/slurm.sbatch"), *TINY, "train.iters=2", "train.eval_interval=2",
                    "checkpoint.save_at_end=false", f"run.dir={run_dir}", NAME_OVERRIDE], env, cwd=tmp_path))
    assert "on 2 node(s) (127.0.0.[1-2]), rendezvous 127.0.0.1:" in out
    assert "node 0 of 2" in out and "node 1 of 2" in out
    assert "world 2 = tp 1 x pp 1 x dp 2" in out
    losses = _train_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    assert OmegaConf.load(run_dir / "config.yaml").run.name == NAME


@pytest.mark.parametrize("scontrol", [True, False], ids=["scontrol", "no-scontrol"])
def test_sbatch_rendezvous_and_arguments(tmp_path, cache, scontrol):
    """What each node's torchrun is given: nodes, node rank, master from the node list, port from the
    job id, GPUs per node from Slurm, the command and the overrides exactly as passed to sbatch."""
    if not scontrol and shutil.which("scontrol"):
        pytest.skip("a real scontrol is installed")
    bin_dir = tmp_path / "bin"
    _script(bin_dir, "srun", FAKE_SRUN)
    if scontrol:
        _script(bin_dir, "scontrol", FAKE_SCONTROL)
    python = _script(tmp_path, "python", RECORDING_PYTHON)
    nodelist = "gpu-a,gpu-b" if scontrol else "gpu-[003-004,7],cpu1"
    env = _env(cache, bin_dir, SLURM_JOB_ID="123456", SLURM_NNODES="2", SLURM_JOB_NODELIST=nodelist,
               SLURM_GPUS_PER_NODE="h100:4", PYTHON=str(python), RECORD_DIR=str(tmp_path))
    args = ["pma-merge", "root=/ckpt/run 1", "n=2,3", "output=/out/${method}-n${n}", NAME_OVERRIDE]
    _ok(_run(["bash", str(REPO / "launch/slurm.sbatch"), *args], env, cwd=tmp_path))
    master = "gpu-a" if scontrol else "gpu-003"
    for node in (0, 1):
        lines = (tmp_path / f"node-{node}.txt").read_text().splitlines()
        assert lines[:8] == [f"NODE_RANK={node}", "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                             f"--master-addr={master}", "--master-port=23456", "--nproc-per-node=4"]
        assert lines[8].endswith("/pma-merge") and lines[9:] == args[1:]


def test_merge_multirun_gives_every_job_its_own_output(tp2_run, tmp_path):
    """pma-merge -m over two settings: the output pattern resolves per job, or (no output given) each
    job writes into its own sweep directory; pma_merge.json records each job's setting."""
    ckpt = tp2_run[0] / "checkpoints"
    env = _env(tmp_path)
    _ok(_run(["pma-merge", "-m", f"root={ckpt}", "n=2,3", "output=" + str(tmp_path / "merged" / "${method}-n${n}"),
              f"hydra.sweep.dir={tmp_path / 'sweep'}"], env))
    for n in (2, 3):
        record = json.loads((tmp_path / "merged" / f"sma-n{n}" / "iter_0000003" / "pma_merge.json").read_text())
        assert record["method"] == "sma" and len(record["inputs"]) == n
        assert [i["iteration"] for i in record["inputs"]] == list(range(4 - n, 4))

    _ok(_run(["pma-merge", "-m", f"root={ckpt}", "n=2", "method=sma,wma", f"hydra.sweep.dir={tmp_path / 'sweep2'}"],
             env))
    for job, (method, weights) in enumerate([("sma", [0.5, 0.5]), ("wma", [1 / 3, 2 / 3])]):
        record = json.loads((tmp_path / "sweep2" / str(job) / "iter_0000003" / "pma_merge.json").read_text())
        assert record["method"] == method
        assert [i["weight"] for i in record["inputs"]] == pytest.approx(weights)


def test_train_multirun_gives_every_job_its_own_run_dir(tmp_path, cache):
    sweep = tmp_path / "sweep"
    _ok(_run(["pma-train", "-m", *TINY, "train.iters=1", "train.lr=1e-3,2e-3", "checkpoint.save_at_end=false",
              f"hydra.sweep.dir={sweep}"], _env(cache)))
    for job, lr in enumerate([1e-3, 2e-3]):
        saved = OmegaConf.load(sweep / str(job) / "config.yaml")
        assert saved.run.dir == str(sweep / str(job)) and saved.train.lr == lr
        assert sorted(_train_losses(sweep / str(job))) == [1]


def test_srun_without_torchrun_forms_the_process_group_from_slurm(tp2_run, tmp_path, cache):
    """submitit / `srun pma-...` start every rank themselves: ranks, world size and master come from
    Slurm's variables, before the job's config is validated (hydra callback) and when the process
    group starts."""
    bin_dir = tmp_path / "bin"
    srun = _script(bin_dir, "srun", FAKE_SRUN)
    env = _env(cache, bin_dir, SLURM_JOB_ID="77", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               MASTER_PORT=str(free_port()))
    # Validation sees the step's 2 tasks: dp = 2, so 2 samples cannot be split into micro-batches of 2.
    proc = _run([str(srun), "--ntasks-per-node=2", "pma-train", *TINY, "train.global_batch_size=2",
                 f"run.dir={tmp_path / 'run'}"], env)
    assert proc.returncode != 0 and "is not a multiple of micro_batch_size*dp = 2*2" in proc.stdout, proc.stdout[-3000:]
    # A real 2-rank merge: each task finds its rank in SLURM_PROCID.
    out = tmp_path / "merged"
    _ok(_run([str(srun), "--ntasks-per-node=2", "pma-merge", f"root={tp2_run[0] / 'checkpoints'}", "n=3",
              f"output={out}", "progress_bar=false"], env))
    record = json.loads((out / "iter_0000003" / "pma_merge.json").read_text())
    assert record["summary"]["ranks"] == 2 and len(record["inputs"]) == 3


def test_torch_env_from_slurm():
    step = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "16", "SLURM_STEP_NODELIST": "gpu[003-004,7]",
            "SLURM_JOB_NODELIST": "gpu[001-007]"}
    env = dict(step)
    assert torch_env_from_slurm(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                         "MASTER_ADDR": "gpu003", "MASTER_PORT": "23456"}
    assert env["RANK"] == "5" and torch_env_from_slurm(env) == {}  # idempotent
    # Only what is missing: a MASTER_PORT of the user's stays; SLURM_NTASKS when the step count is absent.
    env = {k: v for k, v in step.items() if k not in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")}
    env["MASTER_PORT"] = "29999"
    assert torch_env_from_slurm(env) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                         "MASTER_ADDR": "gpu001"}
    assert env["MASTER_PORT"] == "29999"
    # Untouched: torchrun's ranks, no Slurm, and the batch script itself (no step: SLURM_NTASKS is the allocation's).
    assert torch_env_from_slurm({**step, "RANK": "0"}) == {}
    assert torch_env_from_slurm({}) == {}
    batch = {k: v for k, v in step.items() if not k.startswith("SLURM_STEP_")}
    assert torch_env_from_slurm(batch) == {} and "RANK" not in batch


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-004,7],cpu1", "gpu003"), ("a1,a2", "a1"), ("node7", "node7"), ("n[1-2]-ib", "n1-ib"),
    ("rack[1-2]-node[01-04]", "rack1-node01"), ("127.0.0.[1-2]", "127.0.0.1"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first
