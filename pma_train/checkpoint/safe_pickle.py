"""What a checkpoint's pickles may contain, and unpicklers that admit nothing else.

A torch_dist checkpoint is made of pickles: `.metadata` (read by torch with plain `pickle.load`),
and torch.save archives (a zip whose `data.pkl` is a pickle) for every tensor chunk, every byte
entry (megatron-core's ShardedObjects: `common_state`, `rng_state`, read by torch with
`weights_only=False`) and the legacy `common.pt`. A pickle can name any importable callable and
call it, so a crafted checkpoint runs code when loaded. Every pickle the project reads from a
checkpoint is checked here first, against the globals real checkpoints contain (the allow-list
below), and anything else is refused by name. This module is the one home of that list.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import torch

# ----------------------------------------------------------------------------- the allow-list
# Found by listing every GLOBAL / STACK_GLOBAL of every pickle in: pma-train checkpoints (tiny
# dense fp32 at 1 rank, tiny MoE bf16 at EP=2 with dropout), a pma-merge output, the Megatron-LM
# GPTModel checkpoint of tests/gpt_checkpoint_writer.py (TP=2) and a plain torch DCP checkpoint
# (torch.distributed.checkpoint.save), all written by torch 2.14 and megatron-core 0.19; plus what
# older writers and public Megatron-LM releases put there (marked "not seen").

_DTYPES = frozenset(("torch", n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype))
# torch.save names a tensor's storage by its legacy typed class (torch.FloatStorage, ...).
_STORAGES = frozenset(("torch", n) for n in dir(torch)
                      if n.endswith("Storage") and isinstance(getattr(torch, n), type))

_DCP = "torch.distributed.checkpoint"
# `.metadata`: torch DCP's Metadata and what it holds.
METADATA_GLOBALS = frozenset({
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.filesystem", "_StorageInfo"),  # storage_data: file, offset, length of every entry
    # megatron-core keeps the save plans in the metadata (all_local_plans) to reuse them
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"),
    (f"{_DCP}.planner", "BytesIOWriteData"),  # not seen: byte entries of the same plans
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch pickles torch.strided
    # torch's own DCP writer records the checkpoint directory as a Path (megatron-core: a str)
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # the same, pickled by Python >= 3.13
    ("collections", "OrderedDict"),
    # torch < 2.2 wrote TensorProperties from the sharded-tensor module (older Megatron-LM releases)
    ("torch.distributed._shard.sharded_tensor.metadata", "TensorProperties"),
    ("torch.distributed._shard.sharded_tensor.metadata", "MEM_FORMAT_ENCODING"),
}) | _DTYPES

# data.pkl of a tensor chunk's torch.save archive: one tensor, its storage and dtype.
TENSOR_GLOBALS = frozenset({
    ("torch._utils", "_rebuild_tensor_v2"),
    ("collections", "OrderedDict"),  # the (empty) backward hooks of _rebuild_tensor_v2
}) | _STORAGES | _DTYPES

# data.pkl of a byte entry (rng_state, common_state) or of common.pt: Python objects.
OBJECT_GLOBALS = TENSOR_GLOBALS | frozenset({
    # rng_state: numpy's RNG state (an ndarray) and torch's ByteTensor states
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),  # the same, written with numpy < 2
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.dtypes", "UInt32DType"),  # not seen: megatron-core admits it for numpy's RNG state
    ("_codecs", "encode"),  # how protocol 2 (torch.save) pickles the ndarray's bytes
    # common_state / common.pt: the run's args and scalars
    ("argparse", "Namespace"),
    # not seen: sets (e.g. in args), spelled the Python 2 way by protocol 2 (torch.save), else builtins
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    # Not seen in our checkpoints: what public Megatron-LM releases hold in `args` and in the rerun
    # state machine's state (megatron.core.safe_globals.SAFE_GLOBALS, admitted by megatron-core's own
    # weights_only loads); all plain classes and enums.
    ("types", "SimpleNamespace"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),  # the same, pickled by Python >= 3.13
    ("signal", "Signals"),
    ("_io", "BytesIO"),
    ("torch._C", "Generator"),
    ("megatron.core.enums", "ModelType"),
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
    ("megatron.core.optimizer.optimizer_config", "OptimizerConfig"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
})

# DeepSpeed ZeRO checkpoints (torch.save archives: *_model_states.pt, *_optim_states.pt), as DeepSpeed
# 0.19 writes them for ZeRO 1 / 2 / 3 in fp32 and bf16: the model and optimizer objects above plus
# ZeRO-3's tensor subclass rebuild and four plain DeepSpeed types (a dataclass, an int enum and two
# loss-scaler records; unpickling sets their fields, runs nothing). Megatron-DeepSpeed adds its
# `args` (argparse.Namespace, admitted above).
DEEPSPEED_GLOBALS = OBJECT_GLOBALS | frozenset({
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),  # ZeRO-3 partitions: a plain Tensor rebuilt as Tensor
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),  # not seen: fp16 runs
})


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; `global_name` is it (e.g. posix.system)."""

    def __init__(self, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(f"refused to unpickle {self.global_name}: not a type checkpoints are made of "
                         "(loading it could run code)")


# ----------------------------------------------------------------------------- unpicklers


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in `allowed`; subclasses say what each stands for (`resolve`)."""

    allowed: frozenset = frozenset()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise UnsafePickleError(module, name)
        return self.resolve(module, name)

    def resolve(self, module: str, name: str):
        return super().find_class(module, name)


class _MetadataUnpickler(RestrictedUnpickler):
    allowed = METADATA_GLOBALS


def load_metadata(path: str | os.PathLike) -> "torch.distributed.checkpoint.metadata.Metadata":
    """A DCP `.metadata` file, unpickled with only the classes it is made of."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    with open(path, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not torch DCP Metadata")
    if getattr(metadata, "storage_meta", None) is None:  # as torch's FileSystemReader does
        metadata.storage_meta = StorageMeta()
    return metadata


class Inert:
    """Stands for an allowed global whose value is not needed (every one, while checking): building, filling or calling it runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _Checker(RestrictedUnpickler):
    def __init__(self, file, allowed: frozenset):
        super().__init__(file)
        self.allowed = allowed

    def resolve(self, module, name):
        return Inert

    def persistent_load(self, pid):
        return pid  # a torch.save storage reference: the bytes are not needed to check the pickle


def check_pickle(data: bytes, allowed: frozenset) -> None:
    """Raise UnsafePickleError if the pickle names a global outside `allowed` (nothing is called)."""
    _Checker(io.BytesIO(data), allowed).load()


# ----------------------------------------------------------------------------- torch.save archives


class FileSlice(io.RawIOBase):
    """A read-only window [start, start+length) of an open file, for zipfile."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, count, self.start + self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def archive_pickles(archive: zipfile.ZipFile) -> list[str]:
    """The pickle members of a torch.save archive; ValueError for anything torch.load would treat
    otherwise (a TorchScript archive, which torch.load hands to torch.jit.load) or read ambiguously."""
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise ValueError("a zip archive with duplicate member names")
    if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
        raise ValueError("a TorchScript archive, not a torch.save one")
    pickles = [n for n in names if n.endswith(".pkl")]
    if not any(n.rsplit("/", 1)[-1] == "data.pkl" for n in pickles):
        raise ValueError("a zip archive without data.pkl, not a torch.save one")
    return pickles


def check_archive(fd: int, start: int, length: int, allowed: frozenset) -> None:
    """Check every pickle of the torch.save archive at [start, start+length) of an open file."""
    if os.pread(fd, 4, start) != b"PK\x03\x04":
        # torch.load would read it with its legacy (pre-1.6) format: several plain pickles.
        raise ValueError("not a torch.save zip archive")
    try:
        archive = zipfile.ZipFile(FileSlice(fd, start, length))
    except zipfile.BadZipFile as err:
        raise ValueError(f"a damaged torch.save archive ({err})") from None
    for name in archive_pickles(archive):
        check_pickle(archive.read(name), allowed)
