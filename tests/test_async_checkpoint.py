"""checkpoint.async_save=true: checkpoints written behind training equal the synchronous ones bit for
bit; a run resumed from them steps on exactly; a job killed while a save is in flight leaves the
previous checkpoint as `latest` and nothing half-published, and its rerun equals the uninterrupted run.
Two real gloo ranks (data parallel, distributed optimizer: the finalize step is collective)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from pma_train.checkpoint import async_save, layout
from pma_train.config import ConfigError, JobConfig, validate
from tests.launch import run_module, test_env, train

COMMON = ["model=tiny", "train.iters=4", "checkpoint.interval=2", "train.log_interval=1", "train.eval_interval=100",
          "train.eval_iters=1", "train.global_batch_size=8", "train.micro_batch_size=2", "train.seq_length=64",
          "schedule.warmup_iters=1", "seed=5", "train.lr=1e-2"]
ITERATIONS = [2, 4]
# Python's and numpy's generators are never seeded (nothing in training draws from them): their saved
# states differ between any two runs, synchronous or not.
UNSEEDED = {"random_rng_state", "np_rng_state"}


@pytest.fixture(scope="module")
def synchronous(tmp_path_factory, cache):
    return train(tmp_path_factory.mktemp("sync") / "run", COMMON + ["checkpoint.async_save=false"], nproc=2,
                 cache_dir=cache)


def _contents(ckpt, scratch) -> dict:
    """Everything a checkpoint stores (every tensor of every rank's shards, common state, rng), read back."""
    out = scratch / f"{abs(hash(str(ckpt)))}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)


def _same(a, b, where: str = "") -> str | None:
    """Where a and b differ (tensors bit for bit, dtype included), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return None if ok else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(set(a) ^ set(b))}"
        return next((d for k in a if k not in UNSEEDED and (d := _same(a[k], b[k], f"{where}/{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: length"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _same(x, y, f"{where}[{i}]")) is not None), None)
    if hasattr(a, "__dict__") and type(a) is type(b):
        return _same(vars(a), vars(b), where)
    return None if a == b else where


def _sidecar(ckpt) -> dict:
    return json.loads((ckpt / layout.TRAIN_STATE_SIDECAR).read_text())


def test_async_checkpoints_equal_synchronous_ones(synchronous, tmp_path, cache):
    run = train(tmp_path / "async", COMMON + ["checkpoint.async_save=true"], nproc=2, cache_dir=cache)
    assert run.losses() == synchronous.losses()
    roots = [r.run_dir / "checkpoints" for r in (synchronous, run)]
    assert [layout.list_iterations(r) for r in roots] == [ITERATIONS, ITERATIONS]
    assert layout.read_tracker(roots[1]) == 4
    tensors = 0
    for it in ITERATIONS:
        sync_ckpt, async_ckpt = (r / layout.iter_dir_name(it) for r in roots)
        expected, got = _contents(sync_ckpt, tmp_path), _contents(async_ckpt, tmp_path)
        assert _same(expected, got) is None, f"iteration {it}: {_same(expected, got)}"
        names = [k for k, v in got.items() if isinstance(v, torch.Tensor)]
        tensors += len(names)
        # model weights and optimizer state, not an empty comparison
        assert any("optimizer" in k for k in names) and any("optimizer" not in k for k in names), names
        assert _sidecar(async_ckpt) == _sidecar(sync_ckpt)
        assert (async_ckpt / "checksums.json").is_file()
    assert tensors > 2 * 15


def test_kill_during_async_save_keeps_previous_latest_and_rerun_is_exact(synchronous, tmp_path, cache):
    run_dir = tmp_path / "killed"
    overrides = [f"run.dir={run_dir}", "logging.progress_bar=false", *COMMON, "checkpoint.async_save=true"]
    env = {**test_env(cache), "PMA_TEST_DIE_AT_SAVE": "2"}  # dies while iteration 4's save is in flight
    killed = run_module(["tests.async_kill_driver", *overrides], nproc=2, env=env)
    assert killed.returncode != 0
    root = run_dir / "checkpoints"
    assert layout.list_iterations(root) == [2] and layout.read_tracker(root) == 2
    assert any(p.name.startswith(layout.TMP_PREFIX) for p in root.iterdir())  # the save had begun
    reference = synchronous.run_dir / "checkpoints"
    assert _same(_contents(reference / layout.iter_dir_name(2), tmp_path),
                 _contents(root / layout.iter_dir_name(2), tmp_path)) is None

    rerun = train(run_dir, COMMON + ["checkpoint.async_save=true"], nproc=2, cache_dir=cache)
    assert "start iteration 2" in rerun.output
    assert {k: v for k, v in rerun.losses().items() if k > 2} == {k: v for k, v in synchronous.losses().items() if k > 2}
    assert not any(p.name.startswith(layout.TMP_PREFIX) for p in root.iterdir())
    last = layout.iter_dir_name(4)
    assert _same(_contents(reference / last, tmp_path), _contents(root / last, tmp_path)) is None


def test_async_save_must_be_a_boolean_or_null():
    cfg = JobConfig()
    cfg.checkpoint.async_save = "yes"
    with pytest.raises(ConfigError, match="checkpoint.async_save"):
        validate(cfg)


def test_staging_copies_cpu_tensors():
    """megatron's own staging (`tensor.to("cpu")`) returns CPU tensors themselves: the next optimizer
    step would then change a checkpoint still being written. Ours copies."""
    weights = torch.arange(6.0)
    staged = async_save.stage([("file", "key", ([("item", b"bytes")], [("item", weights)]))])
    copy = staged[0][2][1][0][1]
    assert torch.equal(copy, torch.arange(6.0)) and staged[0][2][0] == [("item", b"bytes")]
    weights.add_(1.0)  # what the next step does to a parameter, in place
    assert torch.equal(copy, torch.arange(6.0))
