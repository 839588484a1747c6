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
