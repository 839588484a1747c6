"""pma-merge on real model-parallel DeepSpeed checkpoints (CPU, gloo, DS_ACCELERATOR=cpu): tensor
parallel through an mpu (files of mp ranks 00 and 01) and a 2-stage PipelineModule (layer files);
and DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1 + fp32 gradient accumulation) at DP=2.

One 2-rank launch (tests/ds_parallel_driver.py) trains each case 3 steps, merges its checkpoints on
those 2 ranks and loads the merge into a DeepSpeed engine of the same layout. Checked against
DeepSpeed itself: the resumed engine's fp32 master weights (DeepSpeed's safe_get_full_fp32_param) on
every rank equal the fp64 weighted sum of the masters DeepSpeed held after each training step, its
module weights are those cast, and the pipeline's layer files hold them in the training dtype; at DP=2
its first loss is the merged model's.

Cost: one torchrun launch and one 1-rank pma-merge process (~50 s of CPU in all on 2 cores); the error
cases read files only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pma_train.merge.ds.plan import DsPlanError, plan
from tests import ds_parallel_driver as driver
from tests.launch import REPO, free_port, test_env

os.environ.setdefault("DS_ACCELERATOR", "cpu")
CASES = {name: layout for name, layout, _, _ in driver.CASES}
TAGS = [f"global_step{s}" for s in range(1, driver.STEPS + 1)]


def _env() -> dict:
    return {**test_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_parallel")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(REPO / "tests" / "ds_parallel_driver.py"), str(out), str(out / "found.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, [json.loads((out / f"found.json.{rank}").read_text()) for rank in range(2)]


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_resumes_the_weighted_average_on_every_model_parallel_rank(runs, case):
    out, found = runs
    for rank, report in enumerate(r[case] for r in found):
        assert report["masters_equal"] and report["module_equal"], (rank, report)
        assert report["differs_from_newest"] and report["global_steps"] == driver.STEPS, (rank, report)
        assert (report["optimizer"] == "BF16_Optimizer") == case.endswith("bf16opt"), (rank, report)
    newest = sorted(p.name for p in (out / case / TAGS[-1]).iterdir())
    assert found[0][case]["files"] == sorted(newest + ["checksums.json", "pma_merge.json"])
    if CASES[case] == "tp":  # each rank its own shard of every parameter: two mp ranks' files
        assert found[0][case]["params"] == found[1][case]["params"]
        assert any("mp_rank_01" in name for name in newest)
    elif CASES[case] == "dp":  # each rank every parameter's master (DeepSpeed gathers them)
        assert found[0][case]["params"] == found[1][case]["params"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        for report in (r[case] for r in found):
            assert report["resumed_loss"] == report["merged_model_loss"], report
            assert report["stepped"] == driver.STEPS + 1, report
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


def test_bf16_optimizer_checkpoints_merge_on_one_rank_and_read_per_parameter(runs, tmp_path):
    """BF16_Optimizer partitions keep the group's padding and record no zero_stage (DeepSpeed's own
    zero_to_fp32 refuses them): the reference is the masters DeepSpeed held after each step. The
    per-parameter reads of output_format=torch_dist give them bit for bit; pma-merge on one rank writes
    the files the 2-rank merge wrote (which DeepSpeed resumed from), which DeepSpeed's ds_to_universal
    reads as the fp64 weighted sum; a ZeRO stage 0 run's files, which record no parameter order, are
    refused by name."""
    from deepspeed.checkpoint import ds_to_universal

    from pma_train.checkpoint import integrity
    from pma_train.merge.ds.archive import load_objects
    from pma_train.merge.ds.params import positions
    from pma_train.merge.ds.to_torch_dist import read_elements

    out, _ = runs
    case = "dp_z1_bf16opt"
    seen, tags = torch.load(out / f"{case}_masters.pt", weights_only=True), [out / case / tag for tag in TAGS]
    expected = {k: sum(w * s[k].double() for w, s in zip(driver.WEIGHTS, seen)).float() for k in seen[0]}
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"inputs=[{','.join(map(str, tags))}]",
                           "method=explicit", f"weights={driver.WEIGHTS}".replace(" ", ""), "accumulate_dtype=fp64",
                           "carry_optimizer=true", f"output={one}", "progress_bar=false"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for tag, masters in [*zip(tags, seen), (one / TAGS[-1], expected)]:
        ds_plan = plan([tag])
        assert ds_plan.zero_stage == 1 and [p.name for p in positions(ds_plan)] == list(masters)
        for param in positions(ds_plan):
            whole = torch.zeros(param.numel, dtype=torch.float64)
            read_elements(ds_plan, param, 0, 0, param.numel, whole)
            assert torch.equal(whole.float().view(param.shape), masters[param.name]), (tag, param.name)
    two = out / f"{case}_merged" / TAGS[-1]
    digests = [{e.path: e for e in integrity.read_checksums(d).files if e.path.endswith(".pt")}
               for d in (one / TAGS[-1], two)]
    assert digests[0] == digests[1] and len(digests[0]) == 3, digests
    universal = tmp_path / "universal" / TAGS[-1]  # DeepSpeed's own offline reader of BF16_Optimizer files
    ds_to_universal.main(argparse.Namespace(input_folder=str(two), output_folder=str(universal), num_extract_workers=1,
                                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                                            inject_missing_state=True))
    for name, value in expected.items():
        assert torch.equal(torch.load(universal / "zero" / name / "fp32.pt", weights_only=True)["param"], value), name
    zero0 = shutil.copytree(tags[0], tmp_path / "zero0" / TAGS[0])  # what a ZeRO stage 0 run saves
    states = load_objects(zero0 / "mp_rank_00_model_states.pt")
    states["param_shapes"], states["ds_config"]["zero_optimization"]["stage"] = None, 0
    torch.save(states, zero0 / "new.pt")
    os.replace(zero0 / "new.pt", zero0 / "mp_rank_00_model_states.pt")
    with pytest.raises(DsPlanError, match="mp_rank_00_model_states.pt: no param_shapes .a ZeRO stage 0 run"):
        plan([zero0, tags[1], tags[2]])
