"""pma-merge on real model-parallel DeepSpeed checkpoints (CPU, gloo, DS_ACCELERATOR=cpu): tensor
parallel through an mpu (files of mp ranks 00 and 01) and a 2-stage PipelineModule (layer files).

One 2-rank launch (tests/ds_parallel_driver.py) trains each case 3 steps, merges its checkpoints on
those 2 ranks and loads the merge into a DeepSpeed engine of the same layout. Checked against
DeepSpeed itself: the resumed engine's fp32 master weights (DeepSpeed's safe_get_full_fp32_param) on
every rank equal the fp64 weighted sum of the masters DeepSpeed held after each training step, its
module weights are those cast, and the pipeline's layer files hold them in the training dtype.

Cost: one torchrun launch (~25 s of CPU on 2 cores); the error cases read files only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pma_train.merge.ds.plan import DsPlanError, plan
from tests import ds_parallel_driver as driver
from tests.launch import REPO, free_port, test_env

os.environ.setdefault("DS_ACCELERATOR", "cpu")
CASES = {name: layout for name, layout, _, _ in driver.CASES}
TAGS = [f"global_step{s}" for s in range(1, driver.STEPS + 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_parallel")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(REPO / "tests" / "ds_parallel_driver.py"), str(out), str(out / "found.json")]
    proc = subprocess.run(cmd, cwd=REPO, env={**test_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, [json.loads((out / f"found.json.{rank}").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_resumes_the_weighted_average_on_every_model_parallel_rank(runs, case):
    out, found = runs
    for rank, report in enumerate(r[case] for r in found):
        assert report["masters_equal"] and report["module_equal"], (rank, report)
        assert report["differs_from_newest"] and report["global_steps"] == driver.STEPS, (rank, report)
    newest = sorted(p.name for p in (out / case / TAGS[-1]).iterdir())
    assert found[0][case]["files"] == sorted(newest + ["checksums.json", "pma_merge.json"])
    if CASES[case] == "tp":  # each rank its own shard of every parameter: two mp ranks' files
        assert found[0][case]["params"] == found[1][case]["params"]
        assert any("mp_rank_01" in name for name in newest)
    else:  # each stage its own layers, each layer file rewritten from its stage's masters
        assert found[0][case]["params"] == ["0.bias", "0.weight"]
        assert found[1][case]["params"] == ["2.bias", "2.weight", "3.bias", "3.weight"]
        assert all(r[case]["layer_files_equal"] for r in found), [r[case] for r in found]


def _copies(out: Path, case: str, tmp: Path) -> list[Path]:
    return [shutil.copytree(out / case / tag, tmp / case / tag) for tag in TAGS]


def test_pipeline_layouts_this_merge_does_not_read_are_named(runs, tmp_path):
    out, _ = runs
    inputs = _copies(out, "pp_z1_fp32", tmp_path)
    assert len(plan(inputs).layer_units) == 4
    (inputs[0] / "layer_02-model_states.pt").unlink()
    with pytest.raises(DsPlanError, match=r"global_step1: pipeline layer files \[\] not in the newest input, "
                                          r"\['layer_02-model_states.pt'\] only there"):
        plan(inputs)
    for tag in inputs:  # a stage's masters in no layer file (what tied layers look like)
        (tag / "layer_02-model_states.pt").unlink(missing_ok=True)
    with pytest.raises(DsPlanError, match=r"master weights \['2.bias', '2.weight'\] are in no pipeline layer file"):
        plan(inputs)
    for tag in inputs:  # layer files of two tensor-parallel ranks: pipeline x tensor parallel
        shutil.copy(tag / "layer_03-model_states.pt", tag / "layer_03-model_01-model_states.pt")
    with pytest.raises(DsPlanError, match="pipeline x tensor parallel"):
        plan(inputs)
