"""DeepSpeed ZeRO checkpoints in pma-merge: detection and description here (filesystem only, no torch,
no deepspeed), the archive reader in ds/archive.py, the sharded merge in ds/engine.py.

Imported by the selection for every input; deepspeed itself is imported only by ds/archive.py, when a
DeepSpeed input is merged (its pickles hold a few DeepSpeed classes).
"""

from pma_train.merge.ds.layout import (
    FORMAT,
    DsCheckpoint,
    DsLayoutError,
    is_ds_root,
    is_ds_tag,
    list_tags,
    resolve_tag,
    scan,
    step_of,
)

__all__ = ["FORMAT", "DsCheckpoint", "DsLayoutError", "is_ds_root", "is_ds_tag", "list_tags", "resolve_tag",
           "scan", "step_of"]
