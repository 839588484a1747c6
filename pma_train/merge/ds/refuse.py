"""The one message for a DeepSpeed checkpoint given where a pma-train (torch_dist) checkpoint is read
(`checkpoint.init_from`, `checkpoint.load`, pma-export): convert it with pma-merge first. Filesystem only.

Why not read it in place: a DeepSpeed checkpoint keeps every parameter as flat fragments of the DP
ranks' fp32 partitions; a load under another layout would redo pma-merge's conversion on every
start, once per rank. `pma-merge output_format=torch_dist` does it once, sharded, and checks the
names before writing; its output loads under any TP / PP / EP layout like any pma-train checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from pma_train.checkpoint import layout
from pma_train.merge.ds.layout import is_ds_root, is_ds_tag


def deepspeed_refusal(path: str | Path, option: str) -> str | None:
    """The error for `option=path` if path is a DeepSpeed tag directory or root, else None."""
    path = Path(path)
    if not path.is_dir() or layout.is_checkpoint_dir(path) or layout.list_iterations(path):
        return None
    if not (is_ds_tag(path) or is_ds_root(path)):
        return None
    return (f"{option}: {path} is a DeepSpeed checkpoint; convert it (or a merge of several) into a pma-train "
            f"checkpoint first: pma-merge inputs=[{path}] output_format=torch_dist output=<dir>, "
            f"then {option}=<dir>")
