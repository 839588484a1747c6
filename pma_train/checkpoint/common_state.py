"""megatron-core's common state of a checkpoint (the run's args, iteration, ...), read without megatron-core.

pma-merge's selection needs the consumed samples of a Megatron-LM checkpoint that has no pma_train.json
side-car; importing megatron-core for that would put it (and its ~0.4 s, ~100 MB of imports) on the lean
merge path. The common state is a torch.save archive: the `common_state` byte entry of the DCP data
(megatron-core >= 0.19) or the legacy `common.pt`. Its pickle is read here with the allow-list of
safe_pickle (so nothing outside it is even named), building only plain containers and argparse
Namespaces; every other allowed global (tensors, numpy arrays, megatron-core's enums) stands for an
opaque placeholder, so no module is imported and no code runs. Call after layout.verify_complete.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

from pma_train.checkpoint import layout
from pma_train.checkpoint.safe_pickle import OBJECT_GLOBALS, Inert, RestrictedUnpickler, archive_pickles

LEGACY_FILE = "common.pt"  # megatron-core < 0.19 (and Megatron-LM releases built on it)
ENTRY_PREFIX = "common_state"  # megatron-core >= 0.19: a ShardedObject in the DCP data

# What the common state's values are built from: plain, code-free classes. Everything else on the
# allow-list becomes an inert placeholder (safe_pickle.Inert).
_BUILT = frozenset({
    ("argparse", "Namespace"), ("types", "SimpleNamespace"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"), ("_codecs", "encode"),
})


class _CommonUnpickler(RestrictedUnpickler):
    allowed = OBJECT_GLOBALS

    def resolve(self, module: str, name: str):
        return super().resolve(module, name) if (module, name) in _BUILT else Inert

    def persistent_load(self, pid):
        return Inert()  # a tensor's storage: its bytes are not needed


def read_common_state(ckpt: str | Path) -> dict:
    """The common state dict of a megatron-core checkpoint ({} when it has none)."""
    raw = _raw_common_state(Path(ckpt))
    if raw is None:
        return {}
    archive = zipfile.ZipFile(io.BytesIO(raw))
    data = next(n for n in archive_pickles(archive) if n.rsplit("/", 1)[-1] == "data.pkl")
    state = _CommonUnpickler(io.BytesIO(archive.read(data))).load()
    if isinstance(state, (list, tuple)) and state:  # a ShardedObject's data is stored as [state]
        state = state[0]
    return state if isinstance(state, dict) else {}


def _raw_common_state(ckpt: Path) -> bytes | None:
    # megatron-core reads common.pt first when it exists: so do we.
    if (ckpt / LEGACY_FILE).is_file():
        return (ckpt / LEGACY_FILE).read_bytes()
    metadata = layout.read_metadata(ckpt)
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn.split("/")[0] == ENTRY_PREFIX:
            fd = os.open(ckpt / info.relative_path, os.O_RDONLY)
            try:
                return os.pread(fd, info.length, info.offset)
            finally:
                os.close(fd)
    return None
