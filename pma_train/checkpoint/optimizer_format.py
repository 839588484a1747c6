"""How the distributed optimizer's state is laid out in a checkpoint, and whether this run can load it.

- `dp_reshardable` (the default, Megatron-LM's too): each rank writes and reads its own contiguous
  shard of the optimizer's buckets, the very tensors it trains with: no gather, no extra host copy at
  save or resume, whatever the DP size. The checkpoint is keyed by bucket, so it loads only where
  the buckets are the same: the same TP / PP / EP / virtual-PP layout (a DP change is fine while the
  bucket sizes stay, which is the case without overlapped grad reduction).
- `fully_reshardable`: every rank gathers the optimizer state of its whole DP group into
  per-parameter tensors at save (O(model shard) host memory on each rank) and reads the union of
  what it needs at resume; it loads under any layout, and `pma-merge carry_optimizer` needs it.

Model weights are per-parameter (reshardable) in both, so merges, init_from and exports read either.
The format is found from the checkpoint's own keys (Megatron-LM's checkpoints included); our sidecar
also records the layout and buckets it was saved with, so a mismatch is named before anything loads.
"""

from __future__ import annotations

from pathlib import Path

from pma_train.checkpoint import layout, sidecar
from pma_train.checkpoint.layout import CheckpointError
from pma_train.config.checks import OPTIMIZER_FORMATS

DEFAULT = OPTIMIZER_FORMATS[0]
SIDECAR_KEY = "optimizer_state"
_BUCKET_KEY_MARK = ".gbuf_idx_"  # optimizer.distributed.dp_group_idx_<i>.gbuf_idx_<j>.dtype_...bucket_idx_<k>.<state>


def sharded_metadata(optimizer_format: str) -> dict:
    """What Megatron-LM passes when it builds sharded state dicts (docs/checkpoint-format.md)."""
    if optimizer_format not in OPTIMIZER_FORMATS:
        raise ValueError(f"optimizer format '{optimizer_format}' is not one of {', '.join(OPTIMIZER_FORMATS)}")
    return {"distrib_optim_sharding_type": optimizer_format, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def detect(ckpt_dir: str | Path) -> str:
    """The format a checkpoint's optimizer state was written in (fully_reshardable when it has none,
    or when a non-distributed optimizer wrote it: that state is per-parameter too)."""
    keys = layout.read_metadata(ckpt_dir).state_dict_metadata.keys()
    bucketed = any(layout.is_optimizer_key(k) and ".distributed." in k and _BUCKET_KEY_MARK in k for k in keys)
    return "dp_reshardable" if bucketed else "fully_reshardable"


def _distributed(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _layout(chunks) -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "vpp": len(chunks),
            "dp": ps.get_data_parallel_world_size()}


def _buckets(optimizer) -> dict[str, list]:
    """This rank's bucket sizes (unpadded), per inner optimizer and model-parallel domain."""
    return {f"{i}.dp_group_idx_{o.data_parallel_group_idx}":
            [[list(sizes) for sizes in per_dtype.values()] for per_dtype in o.per_bucket_numel_unpadded]
            for i, o in enumerate(_distributed(optimizer))}


def record(optimizer, chunks, optimizer_format: str) -> dict:
    """Collective: the sidecar entry of a save (format, layout, every domain's buckets)."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, _buckets(optimizer))
    buckets = {}
    for mine in everyone:
        buckets.update(mine)
    written = optimizer_format if _distributed(optimizer) else "fully_reshardable"
    return {"format": written, "layout": _layout(chunks), "buckets": buckets}


def check_loadable(ckpt_dir: Path, optimizer, chunks, saved: dict | None, args) -> str:
    """Collective: the checkpoint's optimizer format, or CheckpointError on every rank when this run
    cannot load it (before anything is read)."""
    import torch.distributed as dist

    optimizer_format = detect(ckpt_dir)
    problem = None
    if optimizer_format == "dp_reshardable":
        problem = _mismatch(optimizer, chunks, saved, args)
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise CheckpointError(_refusal(ckpt_dir, problem))
    return optimizer_format


def check_layout_before_start(ckpt_dir: Path, tp: int, pp: int, ep: int, vpp: int) -> None:
    """Before any process starts: a dp_reshardable checkpoint whose sidecar names another layout is
    refused (check_loadable repeats this, with the buckets, once the model exists)."""
    saved = sidecar.read_record(ckpt_dir, SIDECAR_KEY)
    if saved is None or saved.get("format") != "dp_reshardable":
        return
    problem = _layout_differs(saved.get("layout", {}), {"tp": tp, "pp": pp, "ep": ep, "vpp": vpp})
    if problem is not None:
        raise CheckpointError(_refusal(ckpt_dir, problem))


def _refusal(ckpt_dir: Path, problem: str) -> str:
    return (f"{ckpt_dir}: its optimizer state is dp_reshardable (checkpoint.optimizer_format), keyed by the "
            f"distributed optimizer's buckets, and {problem}. Resume with the layout it was saved with, or "
            "load it with checkpoint.no_load_optim=true (weights only, fresh optimizer), or save it again at "
            "that layout with checkpoint.optimizer_format=fully_reshardable, which loads under any layout")


def _layout_differs(before: dict, now: dict) -> str | None:
    differ = [f"{k.upper()}={before[k]} (now {now[k]})" for k in ("tp", "pp", "ep", "vpp")
              if before.get(k) is not None and before[k] != now[k]]
    return "it was saved at " + ", ".join(differ) if differ else None


def _mismatch(optimizer, chunks, saved: dict | None, args) -> str | None:
    if not _distributed(optimizer):
        return "this run has no distributed optimizer (parallel.use_distributed_optimizer=false)"
    mine = _layout(chunks)
    if saved is None:  # Megatron-LM's: only its args tell the layout
        saved = {"layout": {"tp": getattr(args, "tensor_model_parallel_size", None),
                            "pp": getattr(args, "pipeline_model_parallel_size", None),
                            "ep": getattr(args, "expert_model_parallel_size", 1)}}
    before = saved.get("layout", {})
    differ = _layout_differs(before, mine)
    if differ is not None:
        return differ
    buckets = saved.get("buckets")
    if buckets is not None:
        for domain, sizes in _buckets(optimizer).items():
            if buckets.get(domain) != sizes:
                return (f"its buckets ({domain}: {buckets.get(domain)}) differ from this run's ({sizes}), "
                        f"saved at DP={before.get('dp')} (now {mine['dp']})")
    return None
