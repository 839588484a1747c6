"""perf.cuda_graph_impl=transformer_engine: Transformer Engine's CUDA graphs of the layers, captured
after megatron-core's warmup steps and freed at the end, as Megatron-LM's training loop does.
(`local` graphs are megatron-core's own business: its layers record and replay them by themselves.)"""

from __future__ import annotations

from pma_train.train.hooks import Callback


class TECudaGraphs(Callback):
    def __init__(self):
        self.helper = None
        self.start_iteration = None

    def before_step(self, trainer) -> None:
        from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

        config, t = trainer.parts.model_config, trainer.cfg.train
        if self.helper is None:
            self.helper = TECudaGraphHelper(model=trainer.model, config=config, seq_length=t.seq_length,
                                            micro_batch_size=t.micro_batch_size, optimizers=[trainer.optimizer])
            self.start_iteration = trainer.state.iteration
        warmed_up = trainer.state.iteration - self.start_iteration == config.cuda_graph_warmup_steps
        if self.helper.capture_finished() or not warmed_up:
            return
        if config.cuda_graph_warmup_steps > 0 and trainer.model[0].ddp_config.overlap_param_gather:
            # The capture runs forwards: their parameter gathers must not be the hooks' (Megatron-LM).
            for chunk in trainer.model:
                chunk.disable_forward_pre_hook(param_sync=False)
            self.helper.create_cudagraphs()
            for chunk in trainer.model:
                chunk.enable_forward_pre_hook()
            self.helper.cuda_graph_set_manual_hooks()
        else:
            self.helper.create_cudagraphs()

    def on_train_end(self, trainer, summary: dict) -> None:
        if self.helper is not None and self.helper.graphs_created():
            self.helper.delete_cuda_graphs()
