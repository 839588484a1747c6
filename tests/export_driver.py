"""torchrun --nproc-per-node 1 -m tests.export_driver SPEC.json: pma-train's own forward of checkpoints.

SPEC: {"tokens": [[...], ...], "jobs": [{"model": preset, "model_overrides": {...}, "checkpoint": dir,
"logits": out.pt, "make": false}, ...]}. Each job builds the model with pma_train.model.build_model,
loads the checkpoint with pma_train.checkpoint.state.load_checkpoint and writes the logits of `tokens`
(padded vocabulary, fp32) to `logits`. A job with "make": true first writes that checkpoint itself:
the model's layout-invariant init, every weight perturbed (norms too, so a wrong norm mapping shows),
saved with save_checkpoint as the trainer does; for architectures no test trains.
All jobs share one process start (one rank, TP = PP = EP = 1).
"""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import OmegaConf


def _job_config(job: dict, seq_length: int):
    from pma_train.conf import model_configs_dir
    from pma_train.config import JobConfig, ModelConfig

    cfg = JobConfig()
    preset = OmegaConf.load(model_configs_dir() / f"{job['model']}.yaml")
    cfg.model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), preset,
                                                    job.get("model_overrides", {})))
    cfg.train.seq_length = seq_length
    return cfg


def _make(cfg, platform, path: str) -> None:
    from pma_train.checkpoint.megatron_args import megatron_args
    from pma_train.checkpoint.state import TrainState, save_checkpoint
    from pma_train.model import build_model, padded_vocab_size

    chunks = build_model(cfg, platform, vocab_size=257)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * (0.1 if param.dim() == 1 else 0.02))
    state = TrainState(iteration=1)
    padded = padded_vocab_size(257, cfg.model.make_vocab_size_divisible_by)
    save_checkpoint(path, chunks, None, None, state, megatron_args(cfg, state, padded))


def main() -> None:
    from pma_train.checkpoint.state import load_checkpoint
    from pma_train.model import build_model
    from pma_train.parallel import destroy_distributed, init_distributed
    from pma_train.platform import detect

    spec = json.loads(open(sys.argv[1]).read())
    tokens = torch.tensor(spec["tokens"], dtype=torch.long)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    platform = detect()
    initialised = False
    for job in spec["jobs"]:
        cfg = _job_config(job, tokens.shape[1])
        if not initialised:
            init_distributed(cfg.parallel, platform, cfg.seed)
            initialised = True
        if job.get("make"):
            _make(cfg, platform, job["checkpoint"])
        chunks = build_model(cfg, platform, vocab_size=257)
        load_checkpoint(job["checkpoint"], chunks)
        model = chunks[0].eval()
        with torch.no_grad():
            logits = model(tokens, positions, None)
        torch.save(logits.float().contiguous(), job["logits"])
    destroy_distributed()


if __name__ == "__main__":
    main()
