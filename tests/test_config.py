"""Bad configs fail with one clear error naming the field, before any process group exists."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pma_train.config import ConfigError, JobConfig, check_writable, validate
from tests.launch import REPO, test_env


def job(**sections) -> JobConfig:
    cfg = JobConfig()
    for dotted, value in sections.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("overrides, world, field", [
    ({"parallel__tp": 3}, 3, "parallel.tp"),                      # 3 does not divide 4 heads
    ({"model__num_query_groups": 1, "parallel__tp": 2}, 2, "parallel.tp"),
    ({"parallel__pp": 3}, 3, "parallel.pp"),                      # 4 layers over 3 stages
    ({"parallel__tp": 2}, 3, "parallel"),                         # world 3 is not a multiple of tp*pp
    ({"parallel__ep": 2}, 2, "parallel.ep"),                      # dense model
    ({"train__global_batch_size": 6, "train__micro_batch_size": 4}, 1, "train.global_batch_size"),
    ({"schedule__name": "linear"}, 1, "schedule.name"),
    ({"data__paths": ["/nonexistent/corpus"]}, 1, "data.paths"),
    ({"data__prefetch": -1}, 1, "data.prefetch"),
    ({"data__num_workers": -1}, 1, "data.num_workers"),
    ({"checkpoint__load": "/nonexistent/ckpt"}, 1, "checkpoint.load"),
    ({"parallel__vpp": 2}, 1, "parallel.vpp"),
    ({"train__eval_interval": 0}, 1, "train.eval_interval"),
    ({"train__log_interval": 0}, 1, "train.log_interval"),
    ({"train__exit_signals": ["SIGKILL"]}, 1, "train.exit_signals"),   # cannot be caught
    ({"train__exit_signals": ["TERM"]}, 1, "train.exit_signals"),
    ({"train__eval_iters": -1}, 1, "train.eval_iters"),
    ({"train__adam_beta2": 1.0}, 1, "train.adam_beta2"),
    ({"train__adam_beta2": 0.0}, 1, "train.adam_beta2"),
    ({"train__adam_beta1": 1.0}, 1, "train.adam_beta1"),
    ({"train__adam_beta1": -0.1}, 1, "train.adam_beta1"),
    ({"train__weight_decay": -0.1}, 1, "train.weight_decay"),
    ({"train__min_lr": 1e-2}, 1, "train.min_lr"),                # above train.lr=3e-3
    ({"train__clip_grad": -1.0}, 1, "train.clip_grad"),
    ({"train__clip_grad": float("nan")}, 1, "train.clip_grad"),
    ({"train__seq_length": 8192}, 1, "train.seq_length"),         # RoPE, max_position_embeddings=4096
    ({"track__enabled": True, "train__eval_iters": 0}, 1, "track.enabled"),
    ({"track__enabled": True, "track__dtype": "fp16"}, 1, "track.dtype"),
    ({"track__enabled": True, "track__storage": "ram"}, 1, "track.storage"),
    ({"track__enabled": True, "track__dir": "/tmp/track"}, 1, "track.dir"),   # storage=host keeps no files
    ({"track__enabled": True, "track__storage": "disk", "track__buffer_mb": 0}, 1, "track.buffer_mb"),
    ({"checkpoint__load": ".", "checkpoint__init_from": "."}, 1, "checkpoint.init_from"),
])
def test_validate_names_the_field(overrides, world, field):
    with pytest.raises(ConfigError) as err:
        validate(job(**overrides), world_size=world)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_negative_seed_is_refused():
    cfg = JobConfig()
    cfg.seed = -1
    with pytest.raises(ConfigError, match=r"^seed: must be in \[0, 2\*\*32\), got -1"):
        validate(cfg, world_size=1)


def test_default_config_is_valid():
    validate(job(train__eval_iters=0, train__adam_beta1=0.0, train__clip_grad=0.0), world_size=1)  # off switches
    validate(JobConfig(), world_size=1)
    validate(job(parallel__tp=2), world_size=2)
    validate(job(parallel__tp=2), world_size=4)  # dp 2


def _cli(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pma_train.cli.train", *overrides], cwd=REPO,
                          env=test_env(), capture_output=True, text=True, timeout=120)


def test_cli_rejects_bad_layout_before_starting(tmp_path):
    proc = _cli("parallel.tp=3", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "configuration error: parallel.tp: 3 does not divide model.num_attention_heads=4" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_cli_rejects_unknown_model(tmp_path):
    proc = _cli("model=no_such_model", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "no_such_model" in proc.stderr and "tiny" in proc.stderr  # hydra lists the available ones


def test_cli_help_lists_groups():
    proc = _cli("--help")
    assert proc.returncode == 0
    assert "model: " in proc.stdout and "schedule: anneal, constant, cosine, wsd" in proc.stdout


def test_output_dirs_must_be_writable_and_nothing_is_created(tmp_path):
    check_writable("checkpoint.dir", str(tmp_path / "new" / "deeper"))  # created later, under a writable parent
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"^checkpoint.dir: {tmp_path / 'file'} is not a directory "
                                          f"\\(it would be created under {tmp_path / 'file'}\\)"):
        check_writable("checkpoint.dir", str(tmp_path / "file" / "ckpt"))


def test_read_only_checkpoint_dir_is_found_before_training():
    """As a user who cannot write there: root writes anywhere, so as root the check runs as nobody
    (pma_train.config needs nothing but the standard library, so any python 3.9+ nobody may run does)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o777)  # run.dir: writable by anyone
        read_only = Path(top) / "read-only"
        read_only.mkdir(mode=0o555)
        code = ("from pma_train.config import JobConfig, check_output_dirs\n"
                f"cfg = JobConfig(); cfg.run.dir = {top!r}; cfg.checkpoint.dir = {str(read_only / 'run' / 'ckpt')!r}\n"
                "check_output_dirs(cfg)")
        proc = _run_unprivileged(["-c", code])
        assert proc.returncode != 0
        assert (f"ConfigError: checkpoint.dir: {read_only} is not writable (it would be created under {read_only})"
                in proc.stderr), proc.stderr[-2000:]


def _run_unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    env = {**test_env(), "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    if os.geteuid() != 0:
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
    for python in (sys.executable, "/usr/bin/python3"):
        try:  # nobody (65534): file modes apply to it
            return subprocess.run([python, *args], env=env, capture_output=True, text=True, timeout=120,
                                  user=65534, group=65534, extra_groups=[], cwd="/")
        except (PermissionError, FileNotFoundError):
            continue  # an interpreter under a directory only root may enter
    pytest.skip("running as root and no python interpreter that user nobody may run")


def test_cli_checks_output_dirs_before_starting(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _cli(f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={tmp_path / 'file' / 'ckpt'}")
    assert proc.returncode == 2
    assert f"configuration error: checkpoint.dir: {tmp_path / 'file'} is not a directory" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_checks_track_dir_before_starting(tmp_path):
    (tmp_path / "file").write_text("")
    proc = _cli(f"run.dir={tmp_path / 'run'}", "track.enabled=true", "track.storage=disk",
                f"track.dir={tmp_path / 'file' / 'track'}")
    assert proc.returncode == 2
    assert f"configuration error: track.dir: {tmp_path / 'file'} is not a directory" in proc.stderr
    assert not (tmp_path / "run").exists()
