"""The checks benchmarks/gpu_acceptance.sh runs between its pma-train jobs, one subcommand each.

    python benchmarks/gpu_acceptance_checks.py env
    python benchmarks/gpu_acceptance_checks.py metric RUN_DIR KIND KEY
    python benchmarks/gpu_acceptance_checks.py falling RUN_DIR
    python benchmarks/gpu_acceptance_checks.py same-losses RUN_A RUN_B
    python benchmarks/gpu_acceptance_checks.py same-weights REFERENCE_CKPT OTHER_CKPT
    python benchmarks/gpu_acceptance_checks.py count RUN_DIR KIND

Each prints one line for the table; `falling`, `same-losses` and `same-weights` exit 1 when the check
fails. Only the standard library and torch are imported at the top, so a check costs little start-up.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path


def env() -> None:
    """Torch's CUDA build, Transformer Engine, and what megatron-core makes of it."""
    import torch

    print("torch", torch.__version__, "cuda build", torch.version.cuda, "available", torch.cuda.is_available())
    print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    print("gpus", torch.cuda.device_count())
    try:
        import transformer_engine  # noqa: F401
        print("transformer_engine import: ok")
    except Exception as err:  # an ImportError, or a TE built for another torch / CUDA
        print("transformer_engine import:", type(err).__name__)
    import megatron.core
    from megatron.core.extensions.transformer_engine import HAVE_TE
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    print("megatron-core", megatron.core.__version__, "HAVE_TE", HAVE_TE, "torch optimizer", USING_PYTORCH_OPTIMIZER)


def _records(run_dir: str, kind: str) -> list[dict]:
    from pma_train.metrics import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    return read_metrics(path, kind) if path.exists() else []


def metric(run_dir: str, kind: str, key: str) -> None:
    values = [r[key] for r in _records(run_dir, kind) if key in r]
    print(values[-1] if values else "none")


def count(run_dir: str, kind: str) -> None:
    print(len(_records(run_dir, kind)))


def falling(run_dir: str) -> int:
    """Train loss finite at every logged step, and lower at the end than at the start."""
    losses = [r["loss"] for r in _records(run_dir, "train")]
    if len(losses) < 2:
        print(f"{len(losses)} train-loss records")
        return 1
    finite = all(math.isfinite(x) for x in losses)
    print(f"loss first/last {losses[0]:.4f}/{losses[-1]:.4f} ({len(losses)} records{'' if finite else ', NOT FINITE'})")
    return 0 if finite and losses[-1] < losses[0] else 1


def same_losses(run_a: str, run_b: str) -> int:
    """The train losses of two runs, step by step: bit for bit, or the largest difference."""
    a = {r["step"]: r["loss"] for r in _records(run_a, "train")}
    b = {r["step"]: r["loss"] for r in _records(run_b, "train")}
    if not a or sorted(a) != sorted(b):
        print(f"steps differ: {sorted(a)} vs {sorted(b)}")
        return 1
    diff = max(abs(a[k] - b[k]) for k in a)
    print(f"max train-loss difference {diff} over {len(a)} steps")
    return 0 if diff == 0.0 else 1


def _full_weights(ckpt_dir: str) -> dict:
    """Every tensor of a torch_dist checkpoint, whole, read by torch's own DCP reader."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "weights.pt"
        dcp_to_torch_save(ckpt_dir, str(out))
        state = torch.load(out, weights_only=False)
    # `_extra_state` (Transformer Engine's FP8 metadata, saved by TE modules only, as bytes or a
    # uint8 tensor) is no weight: a TE checkpoint has it, a CPU-built one does not.
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def same_weights(reference: str, other: str) -> int:
    """Every tensor of `other` equals `reference` cast to its dtype (GPU bf16 parameters are the
    CPU-initialised fp32 ones, cast), and the two hold the same names."""
    ref, oth = _full_weights(reference), _full_weights(other)
    if sorted(ref) != sorted(oth):
        only = sorted(set(ref) ^ set(oth))
        print(f"different tensor names ({len(only)} on one side only, e.g. {only[:3]})")
        return 1
    differ = [k for k in ref if ref[k].shape != oth[k].shape or not ref[k].to(oth[k].dtype).equal(oth[k])]
    dtypes = sorted({f"{ref[k].dtype}->{oth[k].dtype}".replace("torch.", "") for k in ref})
    if differ:
        print(f"{len(differ)} of {len(ref)} tensors differ, e.g. {differ[:3]}")
        return 1
    print(f"{len(ref)} tensors equal ({', '.join(dtypes)})")
    return 0 if len(ref) > 0 else 1


def main(argv: list[str]) -> int:
    commands = {"env": env, "metric": metric, "count": count, "falling": falling,
                "same-losses": same_losses, "same-weights": same_weights}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]](*argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
