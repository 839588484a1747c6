"""Fault injection kept in CI: benchmarks/fault_injection.py --quick SIGKILLs training saves, merges,
pma-data and pma-export at seeded random points and reruns them; nothing may be half-published,
lost, or differ from the uninterrupted result. Every kind of corrupted file is named by pma-check."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import launch


def test_kills_leave_nothing_half_published_and_reruns_match(tmp_path):
    args = [sys.executable, "benchmarks/fault_injection.py", "--quick", "--seed", "1", "--results-dir", str(tmp_path)]
    proc = subprocess.run(args, cwd=launch.REPO, env=launch.test_env(), capture_output=True, text=True, timeout=1500)
    results = json.loads((tmp_path / "fault_injection.json").read_text())
    outcomes = {o["scenario"]: o for o in results["outcomes"]}
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert sum(o["kills"] for o in outcomes.values()) >= 2  # the kills really happened
    for name, o in outcomes.items():
        assert o["failures"] == [] and o["half_published"] == 0 and o["data_lost"] == 0, (name, o)
    assert outcomes["pma-train save"]["in_write_window"] >= 1
    corruptions = {c["kind"]: c for c in results["corruptions"]}
    assert len(corruptions) == 8
    for kind, c in corruptions.items():
        assert c["detected"] and c["untouched"], (kind, c)
