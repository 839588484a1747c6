"""Bad configs fail with one clear error naming the field, before any process group exists."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pma_train.config import ConfigError, JobConfig, validate
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
    ({"checkpoint__load": "/nonexistent/ckpt"}, 1, "checkpoint.load"),
    ({"parallel__vpp": 2}, 1, "parallel.vpp"),
])
def test_validate_names_the_field(overrides, world, field):
    with pytest.raises(ConfigError) as err:
        validate(job(**overrides), world_size=world)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_default_config_is_valid():
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
