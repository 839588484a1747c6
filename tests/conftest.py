"""Checks around every test: what a test patches inside the pytest process, it restores."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _nothing_left_patched():
    """Tests that build models in this process (pma-plan's meta builds) must not leave torch or
    megatron-core patched for the tests after them: cpu_compat.installed() and
    model.spec.local_final_norm() undo their changes on exit."""
    yield
    compat = sys.modules.get("pma_train.cpu_compat")
    assert compat is None or not compat.is_installed(), "the CPU compatibility layer was left installed"
    hybrid_block = sys.modules.get("megatron.core.models.hybrid.hybrid_block")
    assert hybrid_block is None or hybrid_block.TENorm.__name__ != "LocalNorm", \
        "HybridStack's TENorm was left pointing at the local norm"


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """data.cache_dir for the jobs a test starts: the built-in corpus tokenized and the dataset indices
    built once per worker, not once per test file (the library's file lock and atomic publish make a
    cache safe to share between jobs)."""
    return tmp_path_factory.mktemp("data-cache")


# Files that take a minute or more on CI's 2 cores, longest first (measured with --durations; add a
# new long file here). The
# xdist workers take files in collection order (pyproject: --no-loadscope-reorder), so these start
# first and the many short files fill in around them: both workers finish together instead of one
# running a long file alone at the end. A file not listed keeps its place after these.
LONGEST_FIRST = ("test_merge.py", "test_deepspeed_merge.py", "test_fault_injection.py", "test_moe.py", "test_training.py",
                 "test_gpu_acceptance.py", "test_repro.py", "test_deepspeed_to_torch_dist.py", "test_deepspeed_parallel.py", "test_pma_uses.py",
                 "test_guards.py", "test_init.py", "test_untrusted.py", "test_launch.py", "test_export.py", "test_spike.py",
                 "test_integrity.py", "test_exclusive.py", "test_extra_state.py", "test_resume_exact.py", "test_perf.py",
                 "test_plan.py", "test_preemption.py", "test_config.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
