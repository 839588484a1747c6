"""pma-merge on real DeepSpeed ZeRO checkpoints (CPU, gloo, DS_ACCELERATOR=cpu).

A 2-rank DeepSpeed launch (tests/ds_driver.py) trains a tiny MLP under ZeRO-1 / 2 / 3 in fp32, bf16
and fp16 and saves 3 checkpoints of each case; pma-merge's engine merges each case on those 2 ranks
(fp64 accumulation, fp32 for one case) and a DeepSpeed engine resumes from every merge; two runs'
checkpoints are converted to universal checkpoints (DeepSpeed's ds_to_universal) and merged with
the originals. A 3-rank and a 1-rank launch train at DP=3 and DP=1 and merge inputs of different DP
sizes and stages (the MIXES) on 3 and 1 merge ranks; pma-merge's command merges one case on 1 rank.
Checked against DeepSpeed's own tools: its fp32 reconstruction of the output equals the fp64
weighted sum of its reconstruction of the inputs (of the originals, for universal inputs); the
resumed engine's first loss equals the loss of that reconstructed model; the module weights are the
merged master weights cast; the loss scaler of an fp16 run is the newest input's.

Cost: three torchrun launches (~80 s of CPU on 2 cores) and three pma-merge processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pma_train.checkpoint import integrity
from pma_train.merge import SelectionError, resolve_inputs
from pma_train.merge.ds.archive import load_objects
from pma_train.merge.ds.plan import DsPlanError, check_budget, plan
from tests import ds_driver
from tests.launch import REPO, free_port, test_env
from tests.test_lean_imports import run_listing, write_checkpoint

os.environ.setdefault("DS_ACCELERATOR", "cpu")
CASES = {name: (stage, dtype, carry, accumulate) for name, stage, dtype, carry, accumulate in ds_driver.CASES}
STEP_TAGS = [f"global_step{s}" for s in range(1, ds_driver.STEPS + 1)]


def _env() -> dict:
    return {**test_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def _launch(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           str(REPO / "tests" / "ds_driver.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    for world in (2, 3, 1):  # the DP=2 runs first: the other worlds' mixes read them
        _launch(world, str(out), str(out / f"resumed{world}.json"))
    return out


def _fp32(path: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own fp32 reconstruction of a root (its `latest`) or a tag directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (path / "latest").is_file():
        return get_fp32_state_dict_from_zero_checkpoint(str(path))
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def _assert_weighted_sum(merged: dict, expected: dict, exact: bool) -> None:
    assert merged.keys() == expected.keys()
    for key, value in merged.items():
        assert value.dtype == torch.float32
        if exact:  # fp64 accumulation: the fp64 sum, rounded once
            assert torch.equal(value, expected[key].float()), key
        else:
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-6, atol=1e-7)


def _weighted(inputs: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in inputs[0].items()}
    for state, weight in zip(inputs, weights):
        for k, v in state.items():
            total[k] += weight * v.double()
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_reconstruction_of_the_merge_is_the_weighted_sum(runs, case):
    inputs = [_fp32(runs / case / tag) for tag in STEP_TAGS]
    merged = _fp32(runs / f"{case}_merged2")  # through its `latest`
    _assert_weighted_sum(merged, _weighted(inputs, ds_driver.WEIGHTS), exact=CASES[case][3] == "fp64")
    assert any(not torch.equal(merged[k], inputs[-1][k]) for k in merged), "the merge is the newest input"


@pytest.mark.parametrize("case", list(CASES))
def test_module_weights_and_optimizer_state_of_the_output(runs, case):
    stage, dtype, carry, _ = CASES[case]
    out = runs / f"{case}_merged2" / "global_step3"
    merged = _fp32(out)
    if stage < 3:  # the module, whole, in its training dtype: the merged master weights cast
        module = load_objects(out / "mp_rank_00_model_states.pt")["module"]
        for key, value in merged.items():
            assert torch.equal(module[key], value.to(ds_driver.dtype_of(dtype))), key
    newest = runs / case / "global_step3"
    for name in sorted(p.name for p in out.glob("*optim_states.pt")):
        mine, theirs = (load_objects(d / name)["optimizer_state_dict"] for d in (out, newest))
        base = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
        for param, state in mine[base]["state"].items():
            for key, value in state.items():
                if carry:
                    assert torch.equal(value, theirs[base]["state"][param][key]), (name, key)
                else:
                    assert not value.any(), (name, key)


def test_resumed_engine_first_loss_is_the_merged_models(runs):
    for world, names in ((2, set(CASES)), (3, {"mix_dp3", "mix_dp3_z3"}), (1, {"mix_dp1_z1", "mix_dp1_z3"})):
        results = json.loads((runs / f"resumed{world}.json").read_text())
        assert set(results) == names
        for case, found in results.items():
            assert found["resumed"] == found["merged_model"], (case, found)
            assert found["global_steps"] == ds_driver.STEPS + 1, found  # resumed at the newest input's step, stepped


def _original(tag: Path) -> Path:
    """A universal input's source checkpoint (u_<case>/<tag> was made from <case>/<tag>)."""
    run = tag.parent.name
    return tag.parent.parent / run[2:] / tag.name if run.startswith("u_") else tag


@pytest.mark.parametrize("mix", list(ds_driver.MIXES))
def test_inputs_of_other_dp_sizes_stages_or_universal_merge_to_the_weighted_sum(runs, mix):
    """Output of the newest input's layout, merged on 1, 2 or 3 ranks from per-parameter views;
    universal inputs give the merge of the checkpoints they were made from, bit for bit."""
    world, _ = ds_driver.MIXES[mix]
    inputs = [_fp32(_original(tag)) for tag in ds_driver.mix_inputs(runs, mix)]
    out = runs / f"{mix}_merged{world}"
    _assert_weighted_sum(_fp32(out), _weighted(inputs, ds_driver.WEIGHTS), exact=True)
    newest = ds_driver.mix_inputs(runs, mix)[-1]
    assert sorted(p.name for p in (out / newest.name).glob("*.pt")) == sorted(p.name for p in newest.glob("*.pt"))
    summary = json.loads((out / newest.name / "pma_merge.json").read_text())["summary"]
    assert summary["ranks"] == world and summary["peak_rss_above_start_bytes"] <= ds_driver.BUDGET, summary
    # the ranks together read each input's parameters once: only the ranges their output partitions hold
    assert summary["bytes_read"] == len(inputs) * sum(v.numel() for v in inputs[0].values()) * 4, summary


def test_fp16_loss_scaler_is_the_newest_inputs(runs):
    for case in ("z2_fp16", "z3_fp16"):
        out, newest = runs / f"{case}_merged2" / "global_step3", runs / case / "global_step3"
        for path in sorted(newest.glob("*optim_states.pt")):
            mine, theirs = (load_objects(d / path.name)["optimizer_state_dict"] for d in (out, newest))
            assert vars(mine["loss_scaler"]) == vars(theirs["loss_scaler"]), path.name
            assert (mine["dynamic_loss_scale"], mine["overflow"]) == (theirs["dynamic_loss_scale"], theirs["overflow"])


def test_output_layout_provenance_and_checksums(runs):
    root = runs / "z2_bf16_merged2"
    assert (root / "latest").read_text() == "global_step3"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")]
    out = root / "global_step3"
    provenance = json.loads((out / "pma_merge.json").read_text())
    assert [i["weight"] for i in provenance["inputs"]] == ds_driver.WEIGHTS
    assert provenance["format"] == "deepspeed" and provenance["zero_stage"] == 2
    recorded = integrity.read_checksums(out)
    assert {e.path for e in recorded.files} == {p.name for p in out.iterdir()} - {"checksums.json"}
    for entry in recorded.files:
        assert integrity.verify_file_entries(out, recorded.algorithm, [entry]) == []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_param_shapes(path: Path, edit) -> None:
    """Rewrite a model-states file with edited param_shapes; saved beside it first (its tensors are
    memory-mapped from the file being replaced)."""
    states = load_objects(path)
    edit(states["param_shapes"][0])
    torch.save(states, path.with_suffix(".new"))
    os.replace(path.with_suffix(".new"), path)


def test_bad_inputs_are_named_before_anything_is_written(runs, tmp_path):
    z2 = [runs / "z2_bf16" / tag for tag in STEP_TAGS]
    # different formats
    torch_dist = tmp_path / "torch_dist" / "iter_0000003"
    write_checkpoint(torch_dist, 3, sidecar=True)
    with pytest.raises(SelectionError, match="different formats"):
        resolve_inputs([str(z2[0]), str(torch_dist)])
    # a missing partition file
    broken = _copy(z2[0], tmp_path / "missing" / "global_step1")
    (broken / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(DsPlanError, match="data-parallel ranks 1..1 are missing .* dp_world_size=2"):
        plan([broken, z2[1]])
    (broken / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(
        broken / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(SelectionError, match="data-parallel rank 0.*missing"):
        resolve_inputs([str(broken), str(z2[1])])
    # `latest` naming a tag that is not there
    root = _copy(runs / "z2_bf16", tmp_path / "root")
    (root / "latest").write_text("global_step9")
    with pytest.raises(SelectionError, match="names tag 'global_step9'"):
        resolve_inputs([str(root)])
    # different parameter names, different shapes
    renamed = _copy(z2[0], tmp_path / "renamed" / "global_step1")
    _edit_param_shapes(renamed / "mp_rank_00_model_states.pt", lambda shapes: shapes.update(
        {"0.kernel": shapes.pop("0.weight")}))
    with pytest.raises(DsPlanError, match=r"parameters \['0.kernel'\] not in the newest input, \['0.weight'\] only"):
        plan([renamed, runs / "z3_bf16" / "global_step3"])
    # a universal checkpoint missing a parameter's file; one as the newest input
    universal = _copy(runs / "u_z1_fp32" / "global_step1", tmp_path / "universal" / "global_step1")
    shutil.rmtree(universal / "zero" / "2.bias")
    with pytest.raises(DsPlanError, match="without zero/2.bias/fp32.pt"):
        plan([universal, z2[1]])
    with pytest.raises(DsPlanError, match="the newest input is a universal checkpoint"):
        plan([z2[0], runs / "u_z1_fp32" / "global_step2"])
    # recorded shapes the partitions cannot hold (DeepSpeed's partitioning rules)
    bigger = _copy(runs / "dp3_z1_fp32" / "global_step1", tmp_path / "bigger" / "global_step1")
    _edit_param_shapes(bigger / "mp_rank_00_model_states.pt", lambda shapes: shapes.update({"4.bias": torch.Size([300])}))
    with pytest.raises(DsPlanError, match="hold more elements than its 3 partitions .* disagree"):
        plan([bigger])
    reshaped = _copy(z2[0], tmp_path / "reshaped" / "global_step1")
    _edit_param_shapes(reshaped / "mp_rank_00_model_states.pt", lambda shapes: shapes.update(
        {"0.weight": torch.Size([6, 24])}))
    with pytest.raises(DsPlanError, match=r"0.weight is \(6, 24\), the newest input has \(24, 6\)"):
        plan([reshaped, z2[1]])
    # the same, through pma-merge: exit 1, the message, no output
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"inputs=[{reshaped},{z2[1]}]",
                           f"output={out}", "progress_bar=false"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "0.weight is (6, 24)" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    # a budget no partition file fits
    with pytest.raises(DsPlanError, match="memory_budget_mb=0: rewriting .* needs"):
        check_budget(plan(z2), torch.float32, 2**10)


def test_pma_merge_cli_merges_a_deepspeed_root_on_one_rank(runs, tmp_path):
    root = runs / "z2_bf16"
    proc, modules = run_listing("pma_train.cli.merge", f"root={root}", "n=3", "v_iterations=1", "dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(root / "global_step1") in proc.stdout and not modules & {"torch", "deepspeed"}, modules
    out = tmp_path / "sma"
    # 2 ranks x 4 samples a step: 8 samples, 128 tokens of seq_length 16 between checkpoints
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"root={root}", "n=3", "v_tokens=128",
                           "seq_length=16", "method=sma", "accumulate_dtype=fp64", f"output={out}", "progress_bar=false",
                           "memory_budget_mb=16"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "384" in proc.stdout and str(root / "global_step1") in proc.stdout, proc.stdout
    _assert_weighted_sum(_fp32(out), _weighted([_fp32(root / tag) for tag in STEP_TAGS], [1 / 3] * 3), exact=True)
    summary = json.loads((out / "global_step3" / "pma_merge.json").read_text())["summary"]
    assert summary["ranks"] == 1 and summary["peak_rss_above_start_bytes"] <= 16 * 2**20, summary
    module = load_objects(out / "global_step3" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(module[k], v.bfloat16()) for k, v in _fp32(out).items())


def test_a_corrupted_file_of_a_recorded_merge_is_named(runs, tmp_path):
    """A pma-merge output used as an input: its checksums are verified before its partitions are read."""
    merged = _copy(runs / "z2_bf16_merged2" / "global_step3", tmp_path / "in" / "global_step3")
    victim = merged / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[-200] ^= 0xFF  # inside the archive's data, same size
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    inputs = [runs / "z2_bf16" / "global_step1", runs / "z2_bf16" / "global_step2", merged]
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"inputs=[{','.join(map(str, inputs))}]",
                           f"output={out}", "progress_bar=false"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and victim.name in proc.stderr, proc.stderr[-3000:]
    assert not (out / "global_step3").exists() and not list(out.glob(".tmp*"))


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_positions_give_deepspeeds_reconstruction(runs, case):
    """output_format=torch_dist reads each parameter from its partitions (ZeRO 1 / 2 / 3 rules of
    merge/ds/params.py): whole and in part, it is what DeepSpeed's zero_to_fp32 reconstructs."""
    from pma_train.merge.ds.params import positions
    from pma_train.merge.ds.to_torch_dist import read_elements

    tag = runs / case / "global_step2"
    ds_plan, expected = plan([tag]), _fp32(tag)
    params = positions(ds_plan)
    assert [p.name for p in params] == list(expected) and all(p.key is None for p in params)  # not pma-train's names
    for param in params:
        whole = torch.zeros(param.numel, dtype=torch.float64)
        read_elements(ds_plan, param, 0, 0, param.numel, whole)
        assert torch.equal(whole.float().view(param.shape), expected[param.name]), param.name
        lo, hi = param.numel // 4, param.numel - 1  # across the DP partitions' boundary
        part = torch.zeros(hi - lo, dtype=torch.float64)
        read_elements(ds_plan, param, 0, lo, hi, part)
        assert torch.equal(part.float(), expected[param.name].flatten()[lo:hi]), param.name


def test_output_format_torch_dist_refuses_a_model_that_is_not_pma_trains(runs, tmp_path):
    out = tmp_path / "converted"
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"root={runs / 'z2_bf16'}", "n=2",
                           "v_iterations=1", "output_format=torch_dist", f"output={out}", "progress_bar=false"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "parameter '0.weight' is not a parameter of pma-train's model" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_param_shapes_that_disagree_with_the_partitions_are_named_before_the_output_exists(runs, tmp_path):
    """A corrupt shape in every input alike (no input differs from the newest): its element count
    against the partition files, before anything is written."""
    root = tmp_path / "corrupt"
    for tag in STEP_TAGS:  # the last parameter one element short: within the group's recorded padding of 1
        _edit_param_shapes(_copy(runs / "z2_bf16" / tag, root / tag) / "mp_rank_00_model_states.pt",
                           lambda shapes: shapes.update({"4.bias": torch.Size([2])}))
    (root / "latest").write_text(STEP_TAGS[-1])
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"root={root}", "n=3", "v_iterations=1",
                           f"output={out}", "progress_bar=false"], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"{root / 'global_step1' / 'mp_rank_00_model_states.pt'}: param_shapes of group 0 hold 842 elements, its 2 "
            "partition files (bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt, ...) 422 + 421 with the group_paddings "
            "[0, 1] they record: param_shapes and partitions disagree") in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    # ZeRO-3 (one part of every parameter per rank file): the rank file that disagrees is named
    z3 = _copy(runs / "z3_fp32" / "global_step1", tmp_path / "z3" / "global_step1")
    _edit_param_shapes(z3 / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       lambda shapes: shapes.update({"2.bias": torch.Size([2])}))
    with pytest.raises(DsPlanError, match=r"do not hold 411 elements.*zero_pp_rank_0_mp_rank_00_optim_states.pt holds 422"):
        plan([z3])


def test_a_deepspeed_merge_that_cannot_fit_its_output_is_refused_before_writing(runs, tmp_path):
    from tests.test_exclusive import temporaries, tmpfs

    inputs = ",".join(str(runs / "z2_bf16" / tag) for tag in STEP_TAGS)  # its output: 27 KiB, the newest's files
    with tmpfs(tmp_path / "fs", "16k") as out:
        args = [sys.executable, "-m", "pma_train.cli.merge", f"inputs=[{inputs}]", f"output={out}", "progress_bar=false"]
        refused = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1, refused.stderr[-3000:]
        assert f"output: {out} has " in refused.stderr and "(the newest input's files, rewritten); nothing was " \
            "written" in refused.stderr, refused.stderr[-3000:]
        assert not (out / "global_step3").exists() and temporaries(out) == []
        # check_free_space=false: past the check, into the full disk (named, the partial output removed)
        unchecked = subprocess.run(args + ["check_free_space=false"], cwd=REPO, env=_env(), capture_output=True,
                                   text=True, timeout=300)
        assert unchecked.returncode == 1 and "disk full" in unchecked.stderr, unchecked.stderr[-3000:]
        assert not (out / "global_step3").exists() and temporaries(out) == []


LEASE_HOLDER = """
import sys
from pma_train.merge.ds.archive import Archive
read = Archive.read
def paused(self, *args, **kwargs):  # the merge's first read of a partition: wait for the test
    Archive.read = read
    print("reading", flush=True)
    sys.stdin.readline()
    return read(self, *args, **kwargs)
Archive.read = paused
from pma_train.cli.merge import main
main()
"""


def test_a_deepspeed_merge_holds_reader_leases_on_its_inputs(runs, tmp_path):
    """While the merge reads, retention of the inputs' root (in another process) may delete none of them."""
    from pma_train.checkpoint import readers

    root = tmp_path / "ds"
    for tag in STEP_TAGS:
        _copy(runs / "z2_bf16" / tag, root / tag)
    (root / "latest").write_text(STEP_TAGS[-1])
    merge = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, f"root={root}", "n=3", "v_iterations=1",
                              f"output={tmp_path / 'out'}", "progress_bar=false"], cwd=REPO, env=_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while (line := merge.stdout.readline()) and line.strip() != "reading":
            pass
        assert line.strip() == "reading", merge.communicate(timeout=60)[1][-3000:]
        for step in range(1, ds_driver.STEPS + 1):
            with readers.deleting(root, step) as free:
                assert not free, step
    finally:
        _, err = merge.communicate("\n", timeout=300)
    assert merge.returncode == 0, err[-3000:]
    assert (tmp_path / "out" / "global_step3" / "pma_merge.json").is_file()
    for step in range(1, ds_driver.STEPS + 1):  # released with the merge
        with readers.deleting(root, step) as free:
            assert free, step
