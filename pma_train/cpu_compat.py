"""The CPU compatibility layer: megatron-core on a host without CUDA.

megatron-core assumes CUDA in many small places (hard-coded `device="cuda"`, `torch.cuda.*`
calls, an RNG tracker driving the CUDA generator). On a CPU-only host we adapt around those
assumptions at run time, without touching megatron-core's files: every replaced attribute is recorded
and `uninstall()` puts each back. A job installs the layer for its whole life (`parallel.use_platform`);
code that builds models inside a longer-lived process (pma-plan, tests) uses `installed()`.
docs/cpu-compat.md lists the measured traps each part covers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

_MISSING = object()
# How to undo each change, in the order made; empty while the layer is not installed.
_undo: list[Callable[[], None]] = []


def _replace(owner, name: str, value) -> None:
    """setattr(owner, name, value), recorded: uninstall() restores the owner's own attribute (or its
    absence, so that an inherited one shows through again)."""
    before = vars(owner).get(name, _MISSING)
    _undo.append(lambda: delattr(owner, name) if before is _MISSING else setattr(owner, name, before))
    setattr(owner, name, value)


def _set_config(owner, name: str, value) -> None:
    """For objects that keep settings outside their __dict__ (torch._dynamo.config)."""
    before = getattr(owner, name)
    _undo.append(lambda: setattr(owner, name, before))
    setattr(owner, name, value)


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    # A bare int means a CUDA ordinal to torch factories (e.g. torch.cuda.current_device()).
    return isinstance(value, int) and not isinstance(value, bool)


_FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
              "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like",
              "full_like", "rand_like", "randn_like", "empty_strided", "scalar_tensor")
_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _cpu_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _redirect(fn):
    def factory(*args, **kwargs):
        return fn(*args, **_cpu_kwargs(kwargs))

    factory.__wrapped__ = fn
    return factory


def _patch_factories() -> None:
    """Rewrite CUDA `device=` arguments of torch factories to the CPU; drop pinned memory.

    Patching the factories (rather than a TorchFunctionMode) also covers code that runs inside
    autograd's backward, where torch-function modes are not active, and costs nothing per op.
    """
    for name in _FACTORIES:
        _replace(torch, name, _redirect(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        _replace(torch.Tensor, name, _redirect(getattr(torch.Tensor, name)))
    plain_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, (str, torch.device)) and _is_cuda_device(a) else a for a in args)
        return plain_to(self, *args, **_cpu_kwargs(kwargs))

    _replace(torch.Tensor, "to", to)
    _replace(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self)


class _FakeStream:
    """Stands in for torch.cuda.Stream / Event: every operation is already synchronous on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        # record_event(), wait_stream(), synchronize(), ...: a no-op that can be chained.
        return lambda *args, **kwargs: _FakeStream()

    def elapsed_time(self, other) -> float:
        return 0.0

    def query(self) -> bool:
        return True


class _DoneWork:
    """What an async collective returns once it has already completed."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _set_cpu_rng_state(state, device=None):
    torch.default_generator.set_state(state)


def _seed_cpu_generator(seed, *args, **kwargs):
    # Never torch.manual_seed here: it calls torch.cuda.manual_seed_all, i.e. this function.
    torch.default_generator.manual_seed(int(seed))


def _own(fn):
    """A distinct function object per patched name: torch.compile's rule table keys on identity."""
    def patched(*args, **kwargs):
        return fn(*args, **kwargs)

    return patched


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # The "CUDA" generator is the CPU default generator, so megatron's RNG tracker forks the
    # generator that CPU dropout really draws from.
    rng = {
        "get_rng_state": lambda device="cuda": torch.default_generator.get_state(),
        "get_rng_state_all": lambda: [torch.default_generator.get_state()],
        "set_rng_state": _set_cpu_rng_state,
        "set_rng_state_all": lambda states: _set_cpu_rng_state(states[0]),
        "manual_seed": _seed_cpu_generator,
        "manual_seed_all": _seed_cpu_generator,
        "seed": lambda: torch.default_generator.seed(),
        "initial_seed": lambda: torch.default_generator.initial_seed(),
    }
    for name, fn in rng.items():
        _replace(cuda, name, _own(fn))
        _replace(cuda.random, name, _own(fn))
    _replace(cuda, "default_generators", (torch.default_generator,))
    _replace(torch._C, "_cuda_setRNGState", _own(_set_cpu_rng_state))

    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats",
                 "reset_max_memory_allocated", "_lazy_init", "init"):
        _replace(cuda, name, _own(lambda *args, **kwargs: None))
    for name in ("current_device", "memory_allocated", "max_memory_allocated",
                 "memory_reserved", "max_memory_reserved"):
        _replace(cuda, name, _own(lambda *args, **kwargs: 0))
    _replace(cuda, "Stream", _FakeStream)
    _replace(cuda, "Event", _FakeStream)
    _replace(cuda, "current_stream", _own(lambda *args, **kwargs: _FakeStream()))
    _replace(cuda, "default_stream", _own(lambda *args, **kwargs: _FakeStream()))
    _replace(cuda, "stream", _own(lambda *args, **kwargs: contextlib.nullcontext()))
    _replace(cuda, "device", _own(lambda *args, **kwargs: contextlib.nullcontext()))
    _replace(cuda, "memory_stats", _own(lambda *args, **kwargs: {}))


def _patch_tensor_methods() -> None:
    _replace(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    _replace(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    plain_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        # megatron's optimizers compare param.type() with 'torch.cuda.FloatTensor'.
        if dtype is None and not kwargs:
            name = plain_type(self)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                name = name.replace("torch.", "torch.cuda.", 1)
            return name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return plain_type(self, dtype, non_blocking, **kwargs)

    _replace(torch.Tensor, "type", tensor_type)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    # torch.cuda._lazy_call only queues callbacks until CUDA initialises, which never happens
    # here: the tracker's RNG states would silently never be set.
    _replace(mc_random, "_lazy_call", lambda callback: callback())
    _replace(mc_random, "device_ctx_manager", lambda *args, **kwargs: contextlib.nullcontext())
    # The tracker warns that the CPU RNG moved inside its fork; here that is by design.
    logger = logging.getLogger(mc_random.__name__)
    _undo.append(lambda level=logger.level: logger.setLevel(level))
    logger.setLevel(logging.ERROR)

    # gloo's all_to_all_single wants split sizes as lists; the MoE alltoall dispatcher passes tensors.
    dist = torch.distributed
    plain_all_to_all_single = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return plain_all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    _replace(dist, "all_to_all_single", all_to_all_single)

    # gloo's all_gather wants equal sizes; the MoE dispatcher under TP gathers uneven token counts.
    plain_all_gather = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list}) <= 1:
            return plain_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        plain_all_gather(buffers, padded, group=group)
        for out, buffer in zip(tensor_list, buffers):
            out.copy_(buffer[: out.shape[0]])
        return _DoneWork() if async_op else None

    _replace(dist, "all_gather", all_gather)


def is_installed() -> bool:
    return bool(_undo)


def install() -> None:
    """Make megatron-core run on a CPU-only host. Idempotent; refuses on CUDA hosts."""
    if is_installed():
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU compatibility layer must not be installed on a CUDA host")
    # `with torch.device(...)` keys on the original factory functions: let torch record them first.
    from torch.utils._device import _device_constructors

    _device_constructors()
    try:
        _patch_torch_cuda()
        _patch_tensor_methods()
        _patch_factories()
        _patch_megatron()
        # megatron compiles a few MoE helpers with torch.compile: on a CPU host that costs seconds of
        # C++ compilation per shape for nothing worth having.
        from torch import _dynamo

        _set_config(_dynamo.config, "disable", True)
    except BaseException:
        uninstall()
        raise


def uninstall() -> None:
    """Put back everything install() replaced, last change first."""
    while _undo:
        _undo.pop()()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """The layer for the duration of a block; left installed if it already was."""
    owner = not is_installed()
    install()
    try:
        yield
    finally:
        if owner:
            uninstall()
