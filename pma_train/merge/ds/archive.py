"""Reading DeepSpeed's torch.save archives under the project's allow-list, two ways.

- `Archive`: the object tree of one file with every tensor left on disk as a `TensorRef` (its
  storage located inside the zip); `read` fetches a range of elements with one pread. What a merge
  rank streams from the N inputs: no file is ever loaded whole.
- `load_objects`: the real objects (DeepSpeed's classes included, deepspeed imported here) with
  tensors memory-mapped, for the one file a merge rewrites (the newest input's).
Both refuse any global outside safe_pickle.DEEPSPEED_GLOBALS by name.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import struct
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pma_train.checkpoint.safe_pickle import (
    DEEPSPEED_GLOBALS,
    FileSlice,
    RestrictedUnpickler,
    UnsafePickleError,
    archive_pickles,
    check_archive,
)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class ArchiveError(ValueError):
    """A file that is not a readable (or not an allowed) torch.save archive; the message names it."""


@dataclass(frozen=True)
class TensorRef:
    """A tensor of an archive, not read: where its elements lie in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    data_offset: int  # absolute file offset of element 0
    contiguous: bool

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class Record:
    """An allowed non-tensor object (DeepSpeed's dataclasses, enums, loss scalers) as its pickled
    arguments and state: reading never needs the class itself."""

    def __init__(self, name: str, args=(), state=None):
        self.name, self.args, self.state = name, args, state

    def __setstate__(self, state):
        self.state = state

    def get(self, field: str):
        return self.state.get(field) if isinstance(self.state, dict) else None


@functools.cache
def _record_class(qualified: str):
    class Bound(Record):
        def __new__(cls, *args):
            obj = object.__new__(cls)
            Record.__init__(obj, qualified, args)
            return obj

        def __init__(self, *args):
            pass

    return Bound


class _IndexUnpickler(RestrictedUnpickler):
    allowed = DEEPSPEED_GLOBALS

    def __init__(self, file, locate):
        super().__init__(file)
        self._locate = locate

    def resolve(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._tensor
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return lambda func, _type, args, _state: func(*args)
        if (module, name) == ("torch", "Size"):
            return tuple
        if name.endswith("Storage") or (module, name) == ("torch", "Tensor"):
            return name
        if module.startswith("deepspeed."):
            return _record_class(f"{module}.{name}")
        return super().resolve(module, name)  # dtypes, OrderedDict, Namespace, numpy, sets

    def _tensor(self, storage, storage_offset, size, stride, *rest):
        _, storage_type, key, _, _ = storage
        dtype = storage_type if isinstance(storage_type, torch.dtype) else _STORAGE_DTYPES[storage_type]
        size, stride = tuple(size), tuple(stride)
        expected, step = [], 1
        for s in reversed(size):
            expected.append(step)
            step *= s
        contiguous = stride == tuple(reversed(expected)) or step <= 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        return TensorRef(dtype, size, self._locate(key) + storage_offset * itemsize, contiguous)

    def persistent_load(self, pid):
        return pid


class Archive:
    """One torch.save archive: `objects` (tensors as TensorRef) and element-range reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.bytes_read = 0
        try:
            size = os.fstat(self.fd).st_size
            check_archive(self.fd, 0, size, DEEPSPEED_GLOBALS)  # every pickle vetted before one is loaded
            self._zip = zipfile.ZipFile(FileSlice(self.fd, 0, size))
            pkl = next(n for n in archive_pickles(self._zip) if n.rsplit("/", 1)[-1] == "data.pkl")
            self._members = {i.filename.rsplit("/", 1)[-1]: i for i in self._zip.infolist()
                             if "/data/" in i.filename}
            self.objects = _IndexUnpickler(io.BytesIO(self._zip.read(pkl)), self._locate).load()
        except UnsafePickleError as err:
            self.close()
            raise ArchiveError(f"{self.path}: {err}") from None
        except (ValueError, KeyError, StopIteration, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as err:
            self.close()
            raise ArchiveError(f"{self.path}: not a readable torch.save archive ({type(err).__name__}: {err})") from None
        self.close()  # indexes of N inputs x all ranks' files stay open cheaply; a read reopens its file

    def _locate(self, key: str) -> int:
        info = self._members[str(key)]
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"storage {key} is compressed")
        header = os.pread(self.fd, 30, info.header_offset)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len

    def read(self, ref: TensorRef, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of a contiguous tensor, flat."""
        if not ref.contiguous:
            raise ArchiveError(f"{self.path}: a non-contiguous tensor {ref.shape}; this merge reads flat partitions")
        stop = ref.numel if stop is None else stop
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)
        itemsize = torch.empty((), dtype=ref.dtype).element_size()
        out = torch.empty((stop - start) * itemsize, dtype=torch.uint8)
        view, done, offset = memoryview(out.numpy()), 0, ref.data_offset + start * itemsize
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise ArchiveError(f"{self.path}: data ends at byte {offset + done} (truncated)")
            done += got
        self.bytes_read += done
        return out.view(ref.dtype)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _LoadUnpickler(RestrictedUnpickler):
    allowed = DEEPSPEED_GLOBALS


# torch.load's pickle_module: its Unpickler resolves only the allow-list (the real classes).
_RESTRICTED = types.ModuleType("pma_train_deepspeed_pickle")
_RESTRICTED.Unpickler = _LoadUnpickler
_RESTRICTED.load = lambda f, **kw: _LoadUnpickler(f, **kw).load()
_RESTRICTED.__version__ = "1"


def import_deepspeed() -> None:
    """DeepSpeed's classes, for load_objects: imported once, up front, not inside a measured merge."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # unpickling needs DeepSpeed's classes, never a device
    for module, _ in DEEPSPEED_GLOBALS:
        if module.startswith("deepspeed."):
            importlib.import_module(module)


def load_objects(path: Path):
    """The file's real objects, tensors memory-mapped (read when touched); vetted first."""
    import_deepspeed()
    fd = os.open(path, os.O_RDONLY)
    try:
        check_archive(fd, 0, os.fstat(fd).st_size, DEEPSPEED_GLOBALS)
    except UnsafePickleError as err:
        raise ArchiveError(f"{path}: {err}") from None
    finally:
        os.close(fd)
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_RESTRICTED)
