"""Importing megatron-core through pma_train defers its import-time `torch.compile` decorations to
the first call: inductor is not imported, torch.compile is torch's own again afterwards, and a
decorated fusion helper still computes what its formula says.

Cost: one fresh interpreter importing megatron-core."""

from __future__ import annotations

import subprocess
import sys

from tests.launch import REPO, test_env

PROBE = """
import sys, torch
real = torch.compile
import pma_train.train.trainer  # imports megatron.core
from megatron.core import jit
from megatron.core.fusions import fused_bias_geglu
print("INDUCTOR", "torch._inductor.compile_fx" in sys.modules)
print("RESTORED", torch.compile is real)
print("DEFERRED", jit.jit_fuser is not real)
y = torch.randn(4, 6, dtype=torch.float64)
a, b = y.chunk(2, -1)
expected = a * 0.5 * (1.0 + torch.tanh(0.79788456 * a * (1 + 0.044715 * a * a))) * b
print("EQUAL", torch.allclose(fused_bias_geglu.geglu(y), expected, rtol=1e-12, atol=0))  # compiled code may round differently
"""


def test_megatron_import_defers_compilation_and_keeps_results():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=test_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = {"INDUCTOR", "RESTORED", "DEFERRED", "EQUAL"}
    lines = dict(words for words in map(str.split, proc.stdout.splitlines()) if words[:1] and words[0] in keys)
    assert lines == {"INDUCTOR": "False", "RESTORED": "True", "DEFERRED": "True", "EQUAL": "True"}, proc.stdout
