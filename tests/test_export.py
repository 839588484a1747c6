"""pma-export: checkpoints of real pma-train runs (dense at TP=2, MoE at EP=2) become Hugging Face models
whose logits equal pma-train's own forward of the same checkpoint.

Tolerance: fp32 on CPU, atol 1e-5 on logits of magnitude ~1 (measured: ~3e-7 for Llama and Mixtral,
~7e-7 for Ernie-4.5-MoE). Only the summation order of a few matmuls differs between the two stacks.

Cost: one module fixture runs the two short trainings side by side, then pma-train's forward of all
checkpoints (tests/export_driver.py, one process) side by side with a 2-rank CLI export; the
remaining exports (and a CLI refusal) run in this process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests import launch
from tests.launch import train

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ATOL = 1e-5
TRAIN = ["train.iters=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=32",
         "schedule.warmup_iters=1", "train.lr=1e-2", "train.eval_interval=100", "train.eval_iters=1",
         "checkpoint.interval=2", "seed=5"]
# A shared expert (2 expert widths: Ernie's moe_num_shared_experts=2) and a leading dense block, like
# the paper's MoE presets; no test trains it: the driver writes the checkpoint (perturbed init).
SHARED = {"layer_pattern": "*-*E", "moe_shared_expert_intermediate_size": 256}
TOKENS = [[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 256, 0, 255],
          [10, 200, 31, 4, 150, 66, 7, 128, 90, 3, 111, 250, 13, 140, 256, 60]]


def model_preset(name: str, overrides: dict | None = None):
    from pma_train.conf import model_configs_dir
    from pma_train.config import ModelConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                               OmegaConf.load(model_configs_dir() / f"{name}.yaml"), overrides or {}))


def _start(args: list[str], nproc: int, log: Path) -> tuple[subprocess.Popen, Path]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={launch.free_port()}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd + args, cwd=launch.REPO, env=launch.test_env(), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    return proc, log


def _finish(started: tuple[subprocess.Popen, Path], timeout: int = 300) -> tuple[int, str]:
    proc, log = started
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    with ThreadPoolExecutor(2) as pool:
        dense = pool.submit(train, base / "dense", ["model=tiny", "parallel.tp=2", *TRAIN], 2)
        moe = pool.submit(train, base / "moe", ["model=tiny_moe", "parallel.ep=2", *TRAIN], 2)
        dense, moe = dense.result(), moe.result()
    ckpt = {"dense": dense.run_dir / "checkpoints", "moe": moe.run_dir / "checkpoints", "shared": base / "shared"}
    spec = {"tokens": TOKENS, "jobs": [
        {"model": "tiny", "checkpoint": str(ckpt["dense"]), "logits": str(base / "dense.pt")},
        {"model": "tiny_moe", "checkpoint": str(ckpt["moe"]), "logits": str(base / "moe.pt")},
        {"model": "tiny_moe", "model_overrides": SHARED, "checkpoint": str(ckpt["shared"]),
         "logits": str(base / "shared.pt"), "make": True}]}
    (base / "spec.json").write_text(json.dumps(spec))
    (base / "taken").mkdir()
    (base / "taken" / "keep.txt").write_text("not an export")
    cli = ["-m", "pma_train.cli.export", f"checkpoint={ckpt['dense']}", "model=tiny"]
    procs = {
        "driver": _start(["-m", "tests.export_driver", str(base / "spec.json")], 1, base / "driver.log"),
        "cli2": _start(cli + [f"output={base / 'cli2'}", "max_shard_size=200KB"], 2, base / "cli2.log"),
    }
    results = {name: _finish(proc) for name, proc in procs.items()}
    assert results["driver"][0] == 0, results["driver"][1][-4000:]
    logits = {name: torch.load(base / f"{name}.pt") for name in ("dense", "moe", "shared")}
    return {"base": base, "ckpt": ckpt, "logits": logits, "cli": results}


def export_checkpoint(tmp_path: Path, checkpoint: Path, model, output: Path | None = None, **kwargs):
    from pma_train.export import ExportConfig, export, prepare

    output = output or tmp_path / "hf"
    plan = prepare(ExportConfig(checkpoint=str(checkpoint), output=str(output), model=model, **kwargs))
    return export(plan)


def hf_logits(directory: Path, expected_class: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == expected_class
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits


def assert_same_logits(hf: torch.Tensor, reference: torch.Tensor, vocab: int = 257) -> float:
    # pma-train's logits cover the padded vocabulary; the export drops the padding rows.
    assert hf.shape == (*reference.shape[:2], vocab)
    diff = (hf - reference[..., :vocab]).abs().max().item()
    assert diff < ATOL, diff
    print(f"max |logit diff| = {diff:.2e}")
    return diff


@pytest.mark.parametrize("name, preset, target, hf_class", [
    ("dense", "tiny", "auto", "LlamaForCausalLM"),
    ("moe", "tiny_moe", "auto", "MixtralForCausalLM"),
    ("moe", "tiny_moe", "ernie4_5_moe", "Ernie4_5_MoeForCausalLM"),
    ("shared", "tiny_moe", "auto", "Ernie4_5_MoeForCausalLM"),
], ids=["dense-tp2-llama", "moe-ep2-mixtral", "moe-ep2-ernie", "shared-expert-dense-block-ernie"])
def test_logits_match_pma_train(work, tmp_path, name, preset, target, hf_class):
    overrides = SHARED if name == "shared" else None
    summary = export_checkpoint(tmp_path, work["ckpt"][name], model_preset(preset, overrides), target=target)
    out = tmp_path / "hf"
    assert summary.hf_class == hf_class and summary.shards == 1
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 257 and config["eos_token_id"] == 256 and config["architectures"] == [hf_class]
    provenance = json.loads((out / "pma_export.json").read_text())
    assert provenance["iteration"] == (1 if name == "shared" else 2)
    assert_same_logits(hf_logits(out, hf_class), work["logits"][name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _check_index(out: Path, max_bytes: int) -> None:
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*.safetensors"))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    total = 0
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == file}
            sizes = [f.get_slice(k).get_shape() for k in keys]
            nbytes = sum(4 * int(torch.tensor(s).prod()) for s in sizes)
            assert nbytes <= max_bytes or len(keys) == 1
            total += nbytes
    assert total == index["metadata"]["total_size"]


def test_two_rank_cli_export_in_small_shards(work):
    code, output = work["cli"]["cli2"]
    assert code == 0, output[-4000:]
    assert "on 2 rank(s)" in output
    out = work["base"] / "cli2"
    _check_index(out, 200_000)
    assert_same_logits(hf_logits(out, "LlamaForCausalLM"), work["logits"]["dense"])


def test_one_shard_in_memory_at_a_time(work, tmp_path):
    summary = export_checkpoint(tmp_path, work["ckpt"]["moe"], model_preset("tiny_moe"), max_shard_size="150KB")
    _check_index(tmp_path / "hf", 150_000)
    assert summary.shards > 5
    # The writer holds the tensors of the shard it is writing, never more.
    assert summary.peak_held_bytes <= summary.largest_shard_bytes < summary.bytes_written / 5
    assert_same_logits(hf_logits(tmp_path / "hf", "MixtralForCausalLM"), work["logits"]["moe"])


def test_existing_output_is_refused_and_overwrite_replaces_an_export(work, tmp_path, monkeypatch, capsys):
    from pma_train.export import ExportError

    # The CLI (in this process): one error line, exit status 2, nothing touched.
    from pma_train.cli.export import main

    monkeypatch.setattr(sys, "argv", ["pma-export", f"checkpoint={work['ckpt']['dense']}", "model=tiny",
                                      f"output={work['base'] / 'taken'}"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("pma-export: error: output:") and "exists" in err, err
    assert (work["base"] / "taken" / "keep.txt").read_text() == "not an export"

    model = model_preset("tiny")
    export_checkpoint(tmp_path, work["ckpt"]["dense"], model)
    with pytest.raises(ExportError, match="exists"):
        export_checkpoint(tmp_path, work["ckpt"]["dense"], model)
    with pytest.raises(ExportError, match="not a previous export"):
        export_checkpoint(tmp_path, work["ckpt"]["dense"], model, output=work["base"] / "taken", overwrite=True)
    (tmp_path / "hf" / "stale.txt").write_text("from the first export")
    export_checkpoint(tmp_path, work["ckpt"]["dense"], model, overwrite=True, keep_padded_vocab=True)
    assert not (tmp_path / "hf" / "stale.txt").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 384
    assert_same_logits(hf_logits(tmp_path / "hf", "LlamaForCausalLM"), work["logits"]["dense"], vocab=384)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_bad_input_fails_before_writing(work, tmp_path, monkeypatch):
    from pma_train.checkpoint.layout import CheckpointError
    from pma_train.export import ExportError
    from pma_train.export import source as source_module

    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path, tmp_path / "missing", model_preset("tiny"))
    # The run's recorded args catch a wrong preset ...
    with pytest.raises(ExportError, match="hybrid_layer_pattern"):
        export_checkpoint(tmp_path, work["ckpt"]["dense"], model_preset("tiny_moe"))
    # ... and without them (another writer's checkpoint) the tensor shapes do.
    monkeypatch.setattr(source_module, "read_common_state", lambda index: {})
    with pytest.raises(ExportError, match="shape mismatch.*linear_fc1"):
        export_checkpoint(tmp_path, work["ckpt"]["dense"], model_preset("tiny", {"ffn_hidden_size": 256}))
    with pytest.raises(ExportError, match="missing tensors"):
        export_checkpoint(tmp_path, work["ckpt"]["dense"], model_preset("tiny4"))
    # An incomplete checkpoint (a data file cut short).
    broken = tmp_path / "broken"
    shutil.copytree(work["ckpt"]["dense"] / "iter_0000002", broken)
    data = sorted(broken.glob("*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        export_checkpoint(tmp_path, broken, model_preset("tiny"))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
