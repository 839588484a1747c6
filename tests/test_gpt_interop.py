"""A checkpoint of Megatron-LM's GPT trainer (GPTModel keys) initialises a pma-train run.

tests/gpt_checkpoint_writer.py trains a megatron-core GPTModel (tiny's shapes) at TP=2 and saves
it in Megatron-LM's layout. pma-train's HybridModel must load it (megatron-core retargets the
keys at load time) at TP=1 and TP=2 and score a batch exactly as the GPTModel did; a pma-train
run with checkpoint.init_from must start from those weights; resuming from it must be refused.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.gpt_checkpoint_writer import ITERATION, PADDED_VOCAB, PROBE
from tests.launch import run_module, test_env, train

# The same weights and tokens; only the reduction order differs between TP layouts (measured
# 2.4e-7 at TP=1, 0.0 at TP=2).
TOL = 1e-5
STEPS = 20  # GPTModel training steps before saving: its loss must be far below a fresh model's
UNTRAINED = math.log(PADDED_VOCAB)  # ~5.95, the loss of a freshly initialised model
PROBE_OVERRIDES = [f"seed={PROBE['seed']}", f"train.iters={PROBE['iters']}", f"train.eval_iters={PROBE['eval_iters']}",
                   f"train.global_batch_size={PROBE['global_batch_size']}",
                   f"train.micro_batch_size={PROBE['micro_batch_size']}", f"train.seq_length={PROBE['seq_length']}",
                   "train.log_interval=1", f"train.eval_interval={PROBE['iters']}", "schedule.warmup_iters=2"]
REFUSAL = "is a GPTModel checkpoint (Megatron-LM); its optimizer state is keyed for GPTModel"


def _run_helper(args: list[str], nproc: int, cache) -> None:
    proc = run_module(["tests.gpt_checkpoint_writer", *map(str, args), "--cache-dir", str(cache)], nproc=nproc,
                      env=test_env(cache))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def gpt(tmp_path_factory, cache):
    """A Megatron-LM GPT checkpoint written at TP=2 (and its twin without rng_state), with its loss."""
    d = tmp_path_factory.mktemp("gpt")
    _run_helper(["write", "--root", d / "gpt", "--no-rng-root", d / "gpt-no-rng", "--out", d / "written.json",
                 "--tp", 2, "--steps", STEPS], nproc=2, cache=cache)
    info = json.loads((d / "written.json").read_text())
    return {"root": d / "gpt", "no_rng_root": d / "gpt-no-rng", **info}


def test_writer_saves_megatron_lm_gpt_layout(gpt):
    from torch.distributed.checkpoint import FileSystemReader

    for root in (gpt["root"], gpt["no_rng_root"]):
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATION)
        ckpt = root / f"iter_{ITERATION:07d}"
        metadata = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        # GPTModel stacks its layers under one key with a leading layer axis; HybridModel never does.
        assert tuple(metadata["decoder.layers.mlp.linear_fc1.weight"].size) == (2, 704, 128)
        assert tuple(metadata["decoder.layers.self_attention.linear_qkv.layer_norm_weight"].size) == (2, 128)
        assert "decoder.final_layernorm.weight" in metadata
        assert not any(k.startswith("decoder.layers.0.") for k in metadata), sorted(metadata)
        assert any(k.startswith("rng_state") for k in metadata) == (root == gpt["root"])
    # Trained, so that loading those weights (or not) shows in the loss.
    assert gpt["train_losses"][-1] < gpt["train_losses"][0] - 1.5, gpt["train_losses"]
    assert gpt["probe_loss"] < UNTRAINED - 1.5, gpt["probe_loss"]


def test_it_passes_the_untrusted_checkpoint_check(gpt):
    """Megatron-LM's pickles hold only what pma_train.checkpoint.safe_pickle admits."""
    from pma_train.checkpoint.layout import check_loadable

    for root in (gpt["root"], gpt["no_rng_root"]):
        check_loadable(root)


def test_hybrid_model_loads_it_at_tp1_and_tp2(gpt, cache, tmp_path):
    """load_checkpoint into a freshly built HybridModel gives the GPTModel's loss on the same batch."""
    out = tmp_path / "loaded.json"
    _run_helper(["load", "--root", gpt["root"], "--root", gpt["no_rng_root"], "--tps", "1,2", "--out", out],
                nproc=2, cache=cache)
    results = json.loads(out.read_text())
    assert len(results) == 4, results
    for name, r in results.items():
        assert r["fresh_loss"] > gpt["probe_loss"] + 1.5, (name, r)  # the load has something to change
        assert abs(r["loaded_loss"] - gpt["probe_loss"]) < TOL, (name, r, gpt["probe_loss"])
        assert r["iteration"] == ITERATION and r["consumed_samples"] == STEPS * PROBE["global_batch_size"], (name, r)


def test_init_from_starts_training_from_the_gpt_weights(gpt, cache, tmp_path):
    run = train(tmp_path / "run", [f"checkpoint.init_from={gpt['root']}", *PROBE_OVERRIDES], nproc=1, cache_dir=cache)
    assert "start iteration 0" in run.output, run.output[-3000:]
    losses = run.losses()
    assert sorted(losses) == list(range(1, PROBE["iters"] + 1)), losses
    # Step 1's loss is the loaded weights' loss on the first batch: exactly the GPTModel's.
    assert abs(losses[1] - gpt["probe_loss"]) < TOL, (losses[1], gpt["probe_loss"])
    assert max(losses.values()) < UNTRAINED - 1.5, losses
    # What the run saves is pma-train's own (HybridModel, per-layer) checkpoint, from iteration 0 on.
    from torch.distributed.checkpoint import FileSystemReader

    saved = tmp_path / "run" / "checkpoints" / f"iter_{PROBE['iters']:07d}"
    keys = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in keys
    assert not any(k.startswith("decoder.layers.self_attention") for k in keys)


@pytest.fixture(scope="module")
def refused(gpt, cache, tmp_path_factory):
    """pma-train asked to resume (optimizer included) from the GPT checkpoint: one plain process."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    return train(run_dir, [f"checkpoint.load={gpt['root']}", *PROBE_OVERRIDES], nproc=None, cache_dir=cache,
                 check=False)


def test_resume_from_gpt_checkpoint_is_refused_by_name(refused, gpt):
    assert refused.returncode != 0
    assert REFUSAL in refused.output, refused.output[-3000:]
    assert f"{gpt['root']}/iter_{ITERATION:07d}" in refused.output
    # Refused before any load was attempted: no dist_checkpointing error, nothing trained.
    assert "dist_checkpointing" not in refused.output and "CheckpointingException" not in refused.output
    assert refused.losses() == {}


def test_resume_refusal_is_a_one_line_configuration_error(refused):
    assert refused.returncode == 2
    assert "Traceback" not in refused.output, refused.output[-3000:]
    assert "pma-train: configuration error: checkpoint.load: " in refused.output
