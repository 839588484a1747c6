"""Host detection: GPUs torch cannot use are named, not silently replaced by the CPU; Transformer
Engine is judged by megatron-core's own flag; HybridModel builds its final norm without TE."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from pma_train.platform import Platform, PlatformError, check_devices
from tests.launch import REPO, test_env


def test_gpus_torch_cannot_use_stop_the_job_unless_gloo_is_asked_for(tmp_path):
    (tmp_path / "nvidia0").touch()
    (tmp_path / "nvidia1").touch()
    (tmp_path / "nvidiactl").touch()  # control node, not a GPU
    with pytest.raises(PlatformError, match=r"NVIDIA GPUs \(nvidia0, nvidia1\).*parallel.backend=gloo"):
        check_devices(None, tmp_path)
    check_devices("gloo", tmp_path)  # CPU on purpose
    check_devices(None, tmp_path / "empty")  # no GPUs: CPU it is


def test_pma_train_refuses_before_starting_anything(tmp_path):
    # The CLI's check runs the real detection; here it is pointed at fake device nodes.
    code = ("import sys; from pma_train import platform; nodes = sys.argv[1]; "
            "plain = platform.check_devices; platform.check_devices = lambda b, d=nodes: plain(b, d); "
            "import pma_train.cli.train as t; t.check_devices = platform.check_devices; "
            "sys.argv = ['pma-train', 'run.dir=' + sys.argv[2]]; t.main()")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dev"), str(tmp_path / "run")], cwd=REPO,
                          env=test_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "NVIDIA GPUs (nvidia0)" in proc.stderr and "parallel.backend=gloo" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_transformer_engine_is_judged_by_megatron_core_and_the_final_norm_needs_none():
    code = ("from megatron.core.extensions.transformer_engine import HAVE_TE\n"
            "from pma_train.model.spec import have_transformer_engine, local_final_norm\n"
            "assert have_transformer_engine() is bool(HAVE_TE)\n"
            "from megatron.core.models.hybrid import hybrid_block\n"
            "from megatron.core.transformer import TransformerConfig\n"
            "te_norm = hybrid_block.TENorm\n"
            "cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization='RMSNorm',"
            " use_cpu_initialization=True)\n"
            "with local_final_norm():\n"  # no CPU layer installed: what a GPU host without TE does
            "    name, norm = hybrid_block.TENorm.__name__, hybrid_block.TENorm(config=cfg, hidden_size=8, eps=1e-5)\n"
            "assert hybrid_block.TENorm is te_norm\n"  # swapped while models are built only
            "import torch; print(name, type(norm).__name__, tuple(norm(torch.ones(2, 8)).shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=test_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # LocalNorm builds megatron-core's torch norm (RMSNorm here), never TE's
    assert proc.stdout.split()[-4:] == ["LocalNorm", "RMSNorm", "(2,", "8)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer refuses CUDA hosts")
def test_cpu_layer_undoes_every_change_and_detection_changes_nothing(monkeypatch):
    import logging

    from megatron.core.tensor_parallel import random as mc_random
    from torch import _dynamo

    from pma_train import cpu_compat
    from pma_train.platform import detect

    owners = [torch, torch.Tensor, torch.nn.Module, torch.cuda, torch.cuda.random, torch._C, torch.distributed,
              mc_random]
    before = [dict(vars(owner)) for owner in owners]
    settings = (_dynamo.config.disable, logging.getLogger(mc_random.__name__).level)
    environ = dict(os.environ)
    monkeypatch.setenv("SLURM_PROCID", "0")  # a Slurm task without torchrun: detect reads, never sets
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert detect() == Platform(torch.device("cpu"), "gloo")
    assert not cpu_compat.is_installed() and "RANK" not in os.environ
    monkeypatch.undo()
    assert dict(os.environ) == environ

    with cpu_compat.installed():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.cuda.current_device() == 0 and torch.cuda.Event().query()
        with cpu_compat.installed():  # nested: the outer owner uninstalls
            pass
        assert cpu_compat.is_installed() and _dynamo.config.disable
    assert not cpu_compat.is_installed()
    for owner, attrs in zip(owners, before):
        now = vars(owner)
        assert now.keys() == attrs.keys(), owner
        assert [k for k in attrs if now[k] is not attrs[k]] == [], owner
    assert (_dynamo.config.disable, logging.getLogger(mc_random.__name__).level) == settings
    with pytest.raises(RuntimeError, match="Expected one of cpu, cuda"):
        torch.zeros(2, device="cudax")  # the real factory again


def test_platform_layer_imports_nothing_above_it():
    """platform (detection), cpu_compat and parallel (process groups) sit below everything else:
    model/ may import them, never the reverse (no model <-> platform cycle)."""
    allowed = {"pma_train.config", "pma_train.platform", "pma_train.cpu_compat", "pma_train.slurm_env",
               "pma_train.parallel", "pma_train"}
    for name in ("platform", "cpu_compat", "parallel", "slurm_env"):
        tree = ast.parse((REPO / "pma_train" / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        ours = {m for m in imported if m and m.startswith("pma_train")}
        assert ours <= allowed, f"{name}.py imports {sorted(ours - allowed)}"


def test_the_seed_sets_pythons_and_numpys_generators_too():
    import random

    import numpy as np

    from pma_train import cpu_compat
    from pma_train.parallel import seed_host

    def draws(seed):
        seed_host(seed)
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    with cpu_compat.installed():
        first, again, other = draws(7), draws(7), draws(8)
    assert first == again and all(a != b for a, b in zip(first, other))
