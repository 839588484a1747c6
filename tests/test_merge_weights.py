"""Merge weights and checkpoint selection, against hand computations."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter, save

from pma_train.checkpoint import layout
from pma_train.config import ConfigError, MergeConfig, validate_merge
from pma_train.merge.weights import DECAY_SHAPES
from pma_train.merge import SelectionError, WeightError, decay, ema, merge_weights, select_spaced, sma, wma


def test_sma_wma():
    assert sma(4) == [0.25] * 4
    assert wma(4) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_ema_matches_the_running_average():
    alpha, n = 0.2, 5
    values = [float(2**i) for i in range(n)]  # distinct "checkpoints"
    running = values[0]
    for v in values[1:]:
        running = alpha * v + (1 - alpha) * running
    weights = ema(n, alpha)
    assert sum(w * v for w, v in zip(weights, values)) == pytest.approx(running)
    assert weights == pytest.approx([0.8**4, 0.2 * 0.8**3, 0.2 * 0.8**2, 0.2 * 0.8, 0.2])
    assert sum(weights) == pytest.approx(1.0)


def test_decay_weights_by_hand():
    # c_i = f(i/n) - f((i+1)/n): linear is SMA; cosine f(1/3) = 0.75, f(2/3) = 0.25;
    # 1-sqrt f(1/4) = 0.5, f(1/2) = 1 - 0.70711, f(3/4) = 1 - 0.86603.
    assert decay(4, "linear") == pytest.approx([0.25] * 4)
    assert decay(3, "cosine") == pytest.approx([0.25, 0.5, 0.25])
    assert decay(4, "1-sqrt") == pytest.approx([0.5, 0.20711, 0.15892, 0.13397], abs=1e-5)
    assert decay(1, "cosine") == pytest.approx([1.0])
    assert merge_weights("decay", 3, decay_shape="cosine") == decay(3, "cosine")


def test_decay_weights_emulate_an_annealed_sgd_run():
    """Constant-LR SGD on a quadratic: the decay merge of its checkpoints equals an annealed run
    whose per-update LR follows the shape, when the gradient does not depend on the weights."""
    torch.manual_seed(0)
    n, per_interval, lr = 5, 3, 0.1
    grads = torch.randn(n * per_interval, 8, dtype=torch.float64)  # fixed "gradients"
    start = torch.randn(8, dtype=torch.float64)
    checkpoints, theta = [start.clone()], start.clone()
    for k in range(1, n):
        theta = theta - lr * grads[(k - 1) * per_interval:k * per_interval].sum(0)
        checkpoints.append(theta.clone())
    for shape in ("linear", "cosine", "1-sqrt"):
        weights = decay(n, shape)
        merged = sum(c * m for c, m in zip(weights, checkpoints))
        lr_scale = [sum(weights[k:]) for k in range(1, n)]  # what each interval's updates are scaled by
        annealed = start - lr * sum(s * grads[(k - 1) * per_interval:k * per_interval].sum(0)
                                    for k, s in zip(range(1, n), lr_scale))
        assert torch.allclose(merged, annealed)
        # ... and that LR scale is the shape itself at k / n.
        assert lr_scale == pytest.approx([DECAY_SHAPES[shape](k / n) for k in range(1, n)])


def test_decay_method_is_validated():
    with pytest.raises(ConfigError, match="decay_shape"):
        validate_merge(MergeConfig(root="/x", method="decay", decay_shape="step"))
    with pytest.raises(WeightError, match="decay_shape"):
        merge_weights("decay", 3, decay_shape="step")


def test_explicit_weights():
    assert merge_weights("explicit", 2, explicit=[1, 3]) == [0.25, 0.75]
    assert merge_weights("explicit", 2, explicit=[1, 3], normalize=False) == [1, 3]
    assert merge_weights("explicit", 2, explicit=[-1, 2], allow_negative=True) == [-1.0, 2.0]
    for bad, match in [([1, float("nan")], "finite"), ([-1, 2], "negative"), ([1, -1], "negative"),
                       ([1], "1 weights for 2")]:
        with pytest.raises(WeightError, match=match):
            merge_weights("explicit", 2, explicit=bad)
    with pytest.raises(WeightError, match="sum to 0"):
        merge_weights("explicit", 2, explicit=[1, -1], allow_negative=True)


def fake_run(root, iterations, tokens_per_iter=100):
    for it in iterations:
        ckpt = root / layout.iter_dir_name(it)
        ckpt.mkdir(parents=True)
        save({"w": torch.zeros(2)}, storage_writer=FileSystemWriter(str(ckpt)))
        (ckpt / "pma_train.json").write_text(json.dumps(
            {"iteration": it, "consumed_samples": it, "consumed_tokens": it * tokens_per_iter}))
    layout.write_tracker(root, iterations[-1])


def test_select_last_n_spaced_v(tmp_path):
    fake_run(tmp_path, [10, 20, 30, 40, 50, 60])
    chosen = select_spaced(tmp_path, n=3, v_tokens=2000)
    assert [c.iteration for c in chosen] == [20, 40, 60]
    assert [c.iteration for c in select_spaced(tmp_path, n=2, v_iterations=30, end_iteration=50)] == [20, 50]
    assert [c.iteration for c in select_spaced(tmp_path, n=4)] == [30, 40, 50, 60]
    with pytest.raises(SelectionError, match="no checkpoint at 0 tokens"):
        select_spaced(tmp_path, n=4, v_tokens=2000)
    with pytest.raises(SelectionError, match="no checkpoint at 4500 tokens"):
        select_spaced(tmp_path, n=2, v_tokens=1500)
    with pytest.raises(SelectionError, match="7 checkpoints requested"):
        select_spaced(tmp_path, n=7)
    with pytest.raises(SelectionError, match="at or before iteration 5"):
        select_spaced(tmp_path, n=1, end_iteration=5)
