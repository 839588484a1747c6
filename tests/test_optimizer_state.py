"""Optimizer state for checkpoints: torch's Adam gets a per-parameter `step`, FusedAdam (TE / apex,
which count steps in the param group) must not, and its group step stays an int after a load."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pma_train.checkpoint.state import _init_optimizer_state, _integer_group_steps


def _optimizer():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    return SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=1e-3))  # megatron's wrapper holds .optimizer


def test_torch_adam_gets_moments_and_a_per_parameter_step():
    wrapper = _optimizer()
    _init_optimizer_state(wrapper, per_param_step=True)
    for state in wrapper.optimizer.state.values():
        assert set(state) == {"exp_avg", "exp_avg_sq", "step"} and float(state["step"]) == 0.0
    for group in wrapper.optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    wrapper.optimizer.step()  # torch's Adam accepts the prepared state
    assert all(float(s["step"]) == 1.0 for s in wrapper.optimizer.state.values())


def test_fused_adam_gets_moments_only_and_an_integer_group_step():
    wrapper = _optimizer()
    _init_optimizer_state(wrapper, per_param_step=False)
    for param, state in wrapper.optimizer.state.items():
        assert set(state) == {"exp_avg", "exp_avg_sq"} and state["exp_avg"].shape == param.shape
    wrapper.optimizer.param_groups[0]["step"] = 7.0  # as a torch-Adam checkpoint records it
    _integer_group_steps(wrapper)
    assert wrapper.optimizer.param_groups[0]["step"] == 7 and isinstance(wrapper.optimizer.param_groups[0]["step"], int)
