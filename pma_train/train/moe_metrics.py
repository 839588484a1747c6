"""MoE router metrics for the train log: the load-balancing (aux) and z-losses the routers record
with megatron-core's metrics tracker, and each MoE layer's expert load (tokens routed per expert).

Both are accumulated over the steps between two log lines and reduced over the ranks that saw
different tokens (data-parallel, pipeline stages; tensor-parallel ranks too with sequence
parallelism), so every rank logs the same numbers for the whole model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pma_train.train.hooks import Callback

_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


class MoEMetrics(Callback):
    def __init__(self, model_chunks: list[torch.nn.Module], model_config, pattern: str, sequence_parallel: bool):
        from megatron.core.transformer.moe.router import TopKRouter

        self.sequence_parallel = sequence_parallel
        self.num_layers = model_config.num_layers
        self.moe_layers = [i + 1 for i, symbol in enumerate(pattern.replace("|", "")) if symbol == "E"]
        # Counts stay on the routers' device until a report: no host sync inside the train step.
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.loads = torch.zeros(self.num_layers, model_config.num_moe_experts, device=device)
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count_tokens)
        self.loss_names = []
        if model_config.moe_aux_loss_coeff and model_config.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
            self.loss_names.append(_AUX_LOSS_NAMES[model_config.moe_router_load_balancing_type])
        if model_config.moe_z_loss_coeff:
            self.loss_names.append("z_loss")

    def _count_tokens(self, router, inputs, output) -> None:
        if router.training and torch.is_grad_enabled():  # training forwards only, not eval or recompute
            routing_map = output[1]
            self.loads[router.layer_number - 1] += routing_map.sum(dim=0).detach().float()

    def log_metrics(self, trainer, steps: int) -> dict:
        return self.report(steps, trainer.num_microbatches)

    def report(self, steps: int, num_microbatches: int) -> dict:
        """Means over the window: {moe_<loss>: value, moe_load_imbalance (max/mean, worst layer),
        moe_load_imbalance_l<k> per MoE layer, moe_expert_load: {layer: token fractions}}."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        out = {}
        if self.loss_names:
            losses: dict = {}
            get_moe_metrics_tracker().report(
                loss_scale=1.0 / (steps * num_microbatches), iteration=0, force_initialize=True,
                track_names=self.loss_names, num_layers=self.num_layers,
                moe_layer_freq=[int(i + 1 in self.moe_layers) for i in range(self.num_layers)], total_loss_dict=losses)
            out |= {f"moe_{name}": float(value) for name, value in losses.items()}
        loads = self.loads.clone()
        groups = [parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group()]
        if self.sequence_parallel:
            groups.append(parallel_state.get_tensor_model_parallel_group())
        for group in groups:
            if dist.get_world_size(group) > 1:
                dist.all_reduce(loads, group=group)
        loads = loads.cpu()
        self.loads.zero_()
        per_layer = {}
        for layer in self.moe_layers:
            counts = loads[layer - 1]
            if counts.sum() > 0:
                per_layer[layer] = counts / counts.sum()
                out[f"moe_load_imbalance_l{layer}"] = float(counts.max() / counts.mean())
        if per_layer:
            out["moe_load_imbalance"] = max(out[f"moe_load_imbalance_l{layer}"] for layer in per_layer)
            out["moe_expert_load"] = {layer: [round(float(x), 5) for x in frac] for layer, frac in per_layer.items()}
        return out
