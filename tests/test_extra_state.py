"""Checkpoints of the other layer spec load: `_extra_state` entries a Transformer Engine model writes
and a local (CPU) model does not, or the reverse, never stop a load; a missing weight still does.

A real tiny run (local spec, 1 rank) writes checkpoints at 2, 4 and 6; tests/extra_state_writer.py
rewrites 4 and 6 with megatron-core as a TE-spec model would have written them (TE's extra state in the
linears, one an FP8-like payload, and the entries the local spec lacks: the final norm's, the core
attentions'), 4 without any `_extra_state` (Megatron-LM's --ckpt-drop-redundant-extra-state), and 4
without one weight. pma-eval and pma-merge of them run side by side; the rest runs in this process.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys

import pytest
import torch

from pma_train.checkpoint import layout
from tests import launch
from tests.launch import run_module, test_env, train

STEPS = 6
COMMON = [f"train.iters={STEPS}", "train.log_interval=1", "train.eval_interval=2", "train.eval_iters=1",
          "train.global_batch_size=4", "train.micro_batch_size=2", "train.seq_length=64",
          "schedule.warmup_iters=1", "checkpoint.interval=2", "seed=7"]
DROPPED = "decoder.layers.3.mlp.linear_fc2.weight"
TE_ONLY = ["decoder.final_norm._extra_state", "decoder.layers.0.self_attention.core_attention._extra_state",
           "decoder.layers.2.self_attention.core_attention._extra_state"]
FP8_ENTRY = "decoder.layers.0.self_attention.linear_qkv._extra_state"


def _stored_objects(ckpt) -> dict[str, object]:
    """Every byte entry of a checkpoint (ShardedObject key -> its unpickled value), read straight from the files."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = layout.read_metadata(ckpt)
    out = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            with open(ckpt / info.relative_path, "rb") as f:
                f.seek(info.offset)
                value = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
            # megatron-core stores a module's extra state as a one-element list
            out[index.fqn.rsplit("/shard_", 1)[0]] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    base = tmp_path_factory.mktemp("extra-state")
    cache = base / "cache"
    run = train(base / "run", COMMON, nproc=None, cache_dir=cache)
    ckpts = base / "run" / "checkpoints"
    proc = run_module(["tests.extra_state_writer", "--ckpt", str(ckpts / layout.iter_dir_name(4)),
                       "--ckpt", str(ckpts / layout.iter_dir_name(6)), "--out", str(base / "v"), "--drop", DROPPED],
                      nproc=None, env=test_env(cache))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    v = {name: base / "v" / name for name in ("te", "no-extra", "no-weight")}
    te4, te6 = (v["te"] / layout.iter_dir_name(i) for i in (4, 6))
    started = {
        "eval": _start(["pma_train.cli.eval", *COMMON, f"run.dir={base / 'eval'}", f"output={base / 'eval.json'}",
                        f"checkpoints=[{te4},{v['no-extra']}]"], base / "eval.log", cache),
        "merged": _start(["pma_train.cli.merge", "progress_bar=false", f"output={base / 'merged'}", "method=sma",
                          f"inputs=[{te4},{te6}]"], base / "merge.log", cache),
    }
    finished = {name: _finish(*started_) for name, started_ in started.items()}
    return {"base": base, "run": run, "v": v, "ckpts": ckpts, **finished}


def _start(args: list[str], log, cache):
    """A CLI run in a plain process, its output to a log file (the two runs go side by side)."""
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=launch.REPO, env=test_env(cache), stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    return proc, log, out


def _finish(proc, log, out, timeout: int = 300) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    out.close()
    return code, log.read_text()


def test_the_variants_hold_what_each_writer_writes(work):
    local = _stored_objects(work["ckpts"] / layout.iter_dir_name(4))
    te = _stored_objects(work["v"]["te"] / layout.iter_dir_name(4))
    assert not set(TE_ONLY) & set(local) and set(TE_ONLY) <= set(te), sorted(te)
    extra = sorted(k for k in local if k.endswith("._extra_state"))
    assert len(extra) == 9 and all(local[k] is None for k in extra), local  # 8 linears + output layer
    assert all(isinstance(te[k], torch.Tensor) and te[k].dtype == torch.uint8 for k in extra + TE_ONLY)
    assert pickle.loads(te[FP8_ENTRY].numpy().tobytes())["iteration"] == 4
    assert not any(k.endswith("._extra_state") for k in _stored_objects(work["v"]["no-extra"] / layout.iter_dir_name(4)))


def test_te_written_and_extra_state_free_checkpoints_evaluate_as_the_original(work):
    code, output = work["eval"]
    assert code == 0, output[-4000:]
    rows = json.loads((work["base"] / "eval.json").read_text())
    logged = work["run"].val_losses()[4]
    assert [r["iteration"] for r in rows] == [4, 4]
    assert all(r["val_loss"] == pytest.approx(logged, abs=1e-6) for r in rows), (rows, logged)


def _model_request(ckpt) -> dict:
    """What a model asks a load for: a ShardedTensor per model tensor of ckpt, a fresh TE extra state per TE_ONLY key."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    request = {k: ShardedTensor.from_rank_offsets(k, torch.empty(m.size, dtype=m.properties.dtype), replica_id=0)
               for k, m in layout.read_metadata(ckpt).state_dict_metadata.items()
               if isinstance(m, TensorStorageMetadata) and not k.startswith("optimizer.")}
    request.update({k: ShardedObject(k, torch.empty(0, dtype=torch.uint8), (1,), (0,), replica_id=(0, 0, 0)) for k in TE_ONLY})
    request[FP8_ENTRY] = ShardedObject(FP8_ENTRY, None, (1,), (0,), replica_id=(0, 0, 0))
    return {"model": request}


def test_a_te_model_keeps_its_own_extra_state_where_a_local_checkpoint_has_none(work):
    """Local -> TE (CPU -> GPU): the entries the checkpoint lacks are not asked of it; the module's stay."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    from pma_train.checkpoint import extra_state

    request = _model_request(work["ckpts"] / layout.iter_dir_name(4))
    extra_state.match_checkpoint(request, work["ckpts"] / layout.iter_dir_name(4))
    model = request["model"]
    assert all(isinstance(model[k], LocalNonpersistentObject) and model[k].unwrap().numel() == 0 for k in TE_ONLY)
    assert isinstance(model[FP8_ENTRY], ShardedObject)  # the checkpoint has it: loaded as before


def test_a_missing_weight_is_named_before_loading(work):
    from pma_train.checkpoint import extra_state
    from pma_train.checkpoint.layout import CheckpointError

    ckpt = work["v"]["no-weight"] / layout.iter_dir_name(4)
    with pytest.raises(CheckpointError) as err:
        extra_state.match_checkpoint(_model_request(work["ckpts"] / layout.iter_dir_name(4)), ckpt)
    assert str(err.value).startswith(f"{ckpt}: has no tensor '{DROPPED}', which this model needs")


def test_merge_copies_extra_state_of_the_newest_input(work):
    """FP8 scaling state is real state: the merge takes every `_extra_state` entry from the newest input,
    unaveraged (the inputs' FP8-like payloads differ: iteration 4's and 6's), docs/performance.md says why."""
    code, output = work["merged"]
    assert code == 0, output[-4000:]
    merged = _stored_objects(work["base"] / "merged" / layout.iter_dir_name(6))
    newest = _stored_objects(work["v"]["te"] / layout.iter_dir_name(6))
    extra = [k for k in newest if k.endswith("._extra_state")]
    assert len(extra) == 12 and all(torch.equal(merged[k], newest[k]) for k in extra)
    assert pickle.loads(merged[FP8_ENTRY].numpy().tobytes())["iteration"] == 6


def test_export_ignores_extra_state(work, tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from omegaconf import OmegaConf

    from pma_train.conf import model_configs_dir
    from pma_train.config import ModelConfig
    from pma_train.export import ExportConfig, export, prepare

    tiny = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                               OmegaConf.load(model_configs_dir() / "tiny.yaml")))

    tensors = {}
    for name, ckpt in (("local", work["ckpts"] / layout.iter_dir_name(6)), ("te", work["v"]["te"] / layout.iter_dir_name(6))):
        export(prepare(ExportConfig(checkpoint=str(ckpt), output=str(tmp_path / name), model=tiny)))
        tensors[name] = load_file(tmp_path / name / "model.safetensors")
    assert sorted(tensors["te"]) == sorted(tensors["local"]) and not any("extra" in k for k in tensors["te"])
    assert all(torch.equal(tensors["te"][k], tensors["local"][k]) for k in tensors["local"])
