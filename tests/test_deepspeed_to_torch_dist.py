"""A DeepSpeed run of pma-train's model, merged by `pma-merge output_format=torch_dist`, starts pma-train runs
and exports (CPU, gloo, DS_ACCELERATOR=cpu, real DeepSpeed and megatron-core).

One 2-rank launch (tests/ds_gpt_driver.py) trains pma-train's tiny model under DeepSpeed ZeRO-3 bf16,
converts 3 checkpoints (weights 0.2 / 0.3 / 0.5, fp64) on those 2 ranks, and writes the independent
reference: DeepSpeed's own fp32 reconstruction of each input, weighted, loaded into the model, saved by
pma-train's save_checkpoint. Checked: the conversion loaded as init_from loads equals the reference
tensor for tensor, under TP=1 and TP=2 (and for tiny_moe's stacked experts); `pma-train checkpoint.init_from=` of the
conversion starts at the reference's validation loss; pma-export of the conversion gives
the reference model's logits; a DeepSpeed checkpoint given to init_from or pma-export directly is
converted on the fly (as pma-merge converts it; nothing left behind), checked before anything starts
(a model that is not pma-train's, another architecture), and refused by checkpoint.load. (The
positions of every parameter under ZeRO 1 / 2 / 3: tests/test_deepspeed_merge.py, on its fixtures.)

Cost: one torchrun launch (~25 s on 2 cores), two 1-rank pma-train runs of one step (at once), one export;
on-the-fly: two 2-rank and one 1-rank pma-train starts (at once), two 1-rank pma-exports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.launch import REPO, free_port, run_module, test_env, train
from tests.test_export import TOKENS, assert_same_logits, export_checkpoint, hf_logits, model_preset

os.environ.setdefault("DS_ACCELERATOR", "cpu")
START = ["train.iters=1", "train.eval_at_start=true", "train.global_batch_size=4", "train.micro_batch_size=2",
         "train.seq_length=32", "train.eval_iters=2", "train.eval_interval=100", "checkpoint.interval=100", "seed=5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_gpt")
    (out / "tokens.json").write_text(json.dumps(TOKENS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(REPO / "tests" / "ds_gpt_driver.py"), str(out), str(out / "tokens.json")]
    proc = subprocess.run(cmd, cwd=REPO, env={**test_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def test_the_conversion_is_deepspeeds_weighted_reconstruction(run):
    found = json.loads((run / "results.json").read_text())
    assert found["loaded_equals_reference"] and found["not_the_newest"], found
    assert found["tp2_differ"] == [], found  # written in row blocks, it loads under another layout
    assert found["moe"] == {"names_not_keys": [], "differ": []}, found["moe"]
    out = run / "merged" / "iter_0000003"
    assert (run / "merged" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    provenance = json.loads((out / "pma_merge.json").read_text())
    assert provenance["format"] == "torch_dist" and provenance["zero_stage"] == 3
    assert [i["weight"] for i in provenance["inputs"]] == [0.2, 0.3, 0.5]
    assert provenance["summary"]["ranks"] == 2


def test_init_from_the_conversion_starts_at_the_merged_models_validation_loss(run, tmp_path):
    with ThreadPoolExecutor(2) as pool:  # one rank each: both at once on 2 cores
        merged, reference = pool.map(lambda name: train(tmp_path / name, START + [f"checkpoint.init_from={run / name}"]),
                                     ("merged", "reference"))
    a, b = merged.records("val")[0], reference.records("val")[0]
    assert a["step"] == b["step"] == 0
    assert a["loss"] == b["loss"], (a, b)


def test_export_of_the_conversion_gives_the_merged_models_logits(run, tmp_path):
    export_checkpoint(tmp_path, run / "merged", model_preset("tiny"))
    assert_same_logits(hf_logits(tmp_path / "hf", "LlamaForCausalLM"), torch.load(run / "reference_logits.pt"))


def test_a_deepspeed_checkpoint_is_converted_on_the_fly_by_init_from_and_pma_export(run, tmp_path):
    """init_from= / pma-export of the DeepSpeed root (converted into a hidden root under run.dir, on 2
    ranks: each its share / beside the output) start at the validation loss of, and export the same
    bytes as, DeepSpeed's own reconstruction of its latest tag; nothing is left behind, also when the
    export fails after the conversion (and a killed job's conversion under run.dir is removed by the
    next). Refused before anything starts: a model that is not pma-train's (by parameter name),
    checkpoint.load (resume); before the conversion: another architecture (by key)."""
    from pma_train.checkpoint.layout import CheckpointError
    from pma_train.cli.train import check_checkpoints
    from pma_train.config import JobConfig

    def check(**given):
        job = JobConfig()
        job.checkpoint.dir = str(tmp_path / "new")
        for key, value in given.items():
            setattr(job.checkpoint, key, str(value))
        check_checkpoints(job)  # pma-train's check before anything starts: exit 2, this line

    check(init_from=run / "ds")
    with pytest.raises(CheckpointError, match=r"checkpoint.init_from: .*foreign/global_step1: parameter '0.weight' is "
                                              "not a parameter of pma-train's model"):
        check(init_from=run / "foreign")
    with pytest.raises(CheckpointError, match=rf"checkpoint.load: {run / 'ds'} is a DeepSpeed checkpoint; "
                                              rf"checkpoint.load resumes an optimizer state.*init_from={run / 'ds'}"):
        check(load=run / "ds")

    reference = run / "newest"  # DeepSpeed's own fp32 reconstruction of the tag `latest` names, saved by pma-train
    export = ["pma_train.cli.export", f"checkpoint={run / 'ds'}", "model=tiny"]
    killed = tmp_path / "from_ds" / ".pma-deepspeed-init_from.0123abcd"  # what a job killed while converting left
    killed.mkdir(parents=True)
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(train, tmp_path / "from_ds", START + [f"checkpoint.init_from={run / 'ds'}"], nproc=2),
                pool.submit(train, tmp_path / "from_reference", START + [f"checkpoint.init_from={reference}"], nproc=2),
                pool.submit(train, tmp_path / "wider", START + [f"checkpoint.init_from={run / 'ds'}",
                                                                "model.ffn_hidden_size=64"], check=False)]
        from_ds, from_reference, wider = (job.result() for job in jobs)
    a, b = from_ds.records("val")[0], from_reference.records("val")[0]
    assert a["step"] == b["step"] == 0 and a["loss"] == b["loss"], (a, b)
    assert (f"checkpoint.init_from: converted the DeepSpeed checkpoint {run / 'ds' / 'global_step3'} into "
            f"{tmp_path / 'from_ds'}/.pma-deepspeed-init_from.") in from_ds.output
    assert "on 2 rank(s)" in from_ds.output
    assert wider.returncode == 1 and not wider.records("train"), wider.output[-3000:]
    assert ("is not of this model's architecture: decoder.layers.1.mlp.linear_fc2.weight: [128, 352] in the "
            "checkpoint, [128, 64] in model tiny") in wider.output

    out = tmp_path / "exports"
    proc = run_module([*export, f"output={out / 'hf'}"], nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"converted the DeepSpeed checkpoint {run / 'ds' / 'global_step3'} into {out}/.pma-deepspeed-hf." in proc.stdout
    export_checkpoint(tmp_path, reference, model_preset("tiny"), output=tmp_path / "hf_reference")
    assert (out / "hf" / "model.safetensors").read_bytes() == (tmp_path / "hf_reference" / "model.safetensors").read_bytes()
    assert json.loads((out / "hf" / "pma_export.json").read_text())["checkpoint"] == str(run / "ds" / "global_step3")
    failed = run_module([*export, "model.ffn_hidden_size=64", f"output={out / 'wider'}"], nproc=1)
    assert failed.returncode == 1, failed.stderr[-3000:]  # found after the conversion, named by the given path
    assert f"{run / 'ds' / 'global_step3'} (converted) does not hold model=tiny: shape mismatch" in failed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["hf"]
    assert not [p for p in (tmp_path / "from_ds").iterdir() if p.name.startswith(".pma-deepspeed-")]  # nor `killed`
    # A library call of pma-export's prepare() reads torch_dist only: it points at the conversion.
    with pytest.raises(CheckpointError, match=f"checkpoint: {run / 'ds'} is a DeepSpeed checkpoint.*output_format"):
        export_checkpoint(tmp_path, run / "ds", model_preset("tiny"))


def test_what_the_conversion_cannot_write_is_refused_before_it_starts(run, tmp_path):
    from pma_train.config import ConfigError, MergeConfig, validate_merge
    from pma_train.merge.ds.to_torch_dist import run_ds_to_torch_dist
    from pma_train.merge.engine import MergeError, MergeRequest
    from pma_train.merge.select import describe

    with pytest.raises(ConfigError, match="output_format"):
        validate_merge(MergeConfig(inputs=[str(run / "ds")], output=str(tmp_path), output_format="hf"))
    request = MergeRequest(inputs=[describe(run / "ds")], weights=[1.0], output_root=tmp_path / "out",
                           carry_optimizer=True)
    with pytest.raises(MergeError, match="carry_optimizer: output_format=torch_dist writes the merged weights only"):
        run_ds_to_torch_dist(request)
    assert not (tmp_path / "out").exists()


def test_a_conversion_that_cannot_fit_its_output_is_refused_before_writing(run, tmp_path):
    from tests.test_exclusive import temporaries, tmpfs

    with tmpfs(tmp_path / "fs", "64k") as out:
        proc = subprocess.run([sys.executable, "-m", "pma_train.cli.merge", f"inputs=[{run / 'ds' / 'global_step3'}]",
                               "output_format=torch_dist", f"output={out}", "progress_bar=false"], cwd=REPO,
                              env={**test_env(), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert f"output: {out} has " in proc.stderr and "(the converted tensors' bytes); nothing was written" \
            in proc.stderr, proc.stderr[-3000:]
        assert not (out / "iter_0000003").exists() and temporaries(out) == []


def test_each_rank_holds_one_row_block_of_the_budget(run):
    """The work is row blocks of the parameters, tiling each one, each (its fp64 accumulator and fp32
    output) within memory_budget_mb less the 4 MiB read block and its buffer: no rank holds a whole tensor of the model
    beyond that, whatever its size."""
    from pma_train.merge.ds.params import locate
    from pma_train.merge.ds.plan import READ_BLOCK_BYTES, plan
    from pma_train.merge.ds.to_torch_dist import conversion_pieces

    params = locate(plan(sorted((run / "ds").glob("global_step*"))))
    room = 16 * 1024
    pieces = conversion_pieces(params, torch.float64, torch.float32, 2 * READ_BLOCK_BYTES + room)
    for param in params:
        mine = [p for p in pieces if p.key == param.key and p.offsets[:len(param.prefix)] == param.prefix]
        rows = [p.offsets[len(param.prefix)] for p in mine]
        assert rows == sorted(rows) and sum(p.sizes[len(param.prefix)] for p in mine) == param.shape[0], param.name
        assert all(12 * torch.Size(p.sizes).numel() <= room for p in mine), param.name
    assert len(pieces) > len(params)  # the larger ones cut
