"""State that crosses hosts in checkpoints: torch's Adam gets a per-parameter `step`, FusedAdam (TE / apex,
which count steps in the param group) must not, its group step stays an int after a load; RNG tracker
states move between CPU and GPU hosts only where they fit."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pma_train.checkpoint.state import init_optimizer_state, integer_group_steps


def _optimizer():
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    return SimpleNamespace(optimizer=torch.optim.AdamW(params, lr=1e-3))  # megatron's wrapper holds .optimizer


def test_torch_adam_gets_moments_and_a_per_parameter_step():
    wrapper = _optimizer()
    init_optimizer_state(wrapper, per_param_step=True)
    for state in wrapper.optimizer.state.values():
        assert set(state) == {"exp_avg", "exp_avg_sq", "step"} and float(state["step"]) == 0.0
    for group in wrapper.optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.ones_like(param)
    wrapper.optimizer.step()  # torch's Adam accepts the prepared state
    assert all(float(s["step"]) == 1.0 for s in wrapper.optimizer.state.values())


def test_fused_adam_gets_moments_only_and_an_integer_group_step():
    wrapper = _optimizer()
    init_optimizer_state(wrapper, per_param_step=False)
    for param, state in wrapper.optimizer.state.items():
        assert set(state) == {"exp_avg", "exp_avg_sq"} and state["exp_avg"].shape == param.shape
    wrapper.optimizer.param_groups[0]["step"] = 7.0  # as a torch-Adam checkpoint records it
    integer_group_steps(wrapper)
    assert wrapper.optimizer.param_groups[0]["step"] == 7 and isinstance(wrapper.optimizer.param_groups[0]["step"], int)


def test_rng_tracker_states_move_between_cpu_and_gpu_hosts_only_when_they_fit():
    from pma_train.checkpoint.rng import transferable

    cpu = {"model-parallel-rng": torch.get_rng_state()}  # a CPU generator's state (5056 bytes)
    cuda = {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}  # what a CUDA generator's looks like
    assert transferable(cpu, {"model-parallel-rng": torch.get_rng_state()})
    assert not transferable(cuda, cpu) and not transferable(cpu, cuda)  # measured on an H200: size errors
    assert not transferable({"expert-parallel-rng": torch.get_rng_state()}, cpu)
