"""Device and backend selection; on hosts without CUDA, a layer that lets megatron-core run on CPU.

megatron-core assumes CUDA in many small places (hard-coded `device="cuda"`, `torch.cuda.*`
calls, an RNG tracker driving the CUDA generator). On a CPU-only host we adapt around those
assumptions at run time, without touching megatron-core's files. Nothing here is installed
when a GPU is present. docs/cpu-compat.md lists the measured traps each part covers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pma_train.slurm_env import torch_env_from_slurm

_installed = False


@dataclass(frozen=True)
class Platform:
    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


class PlatformError(RuntimeError):
    """The host does not match what the job asks for; the message names the cause."""


def nvidia_devices(dev_dir: str | Path = "/dev") -> list[str]:
    """The NVIDIA GPU device nodes of this host (nvidia0, nvidia1, ...), whether torch can use them or not."""
    return sorted(p.name for p in Path(dev_dir).glob("nvidia[0-9]*"))


def check_devices(backend: str | None, dev_dir: str | Path = "/dev") -> None:
    """A host with NVIDIA GPUs that torch cannot use would otherwise train on CPU / gloo without a word."""
    if backend == "gloo" or torch.cuda.is_available():
        return
    gpus = nvidia_devices(dev_dir)
    if gpus:
        raise PlatformError(
            f"this host has NVIDIA GPUs ({', '.join(gpus)}) but torch cannot use them "
            f"(torch.cuda.is_available() is False; torch {torch.__version__} is built for CUDA {torch.version.cuda}: "
            "a driver older than that build, or CUDA_VISIBLE_DEVICES hiding them?). Fix that, or pass "
            "parallel.backend=gloo to train on the CPU on purpose")


def detect(backend: str | None = None) -> Platform:
    """nccl + the local GPU on CUDA hosts; gloo + CPU (with the compatibility layer) elsewhere."""
    torch_env_from_slurm()
    check_devices(backend)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return Platform(torch.device("cuda", local_rank), backend or "nccl")
    install_cpu_compat()
    return Platform(torch.device("cpu"), backend or "gloo")


def init_process_group(backend: str, device: torch.device | None = None) -> None:
    """The default process group; a single process without torchrun gets a world of one."""
    if dist.is_initialized():
        return
    torch_env_from_slurm()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), device_id=device)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        setattr(torch, name, _redirect(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _redirect(getattr(torch.Tensor, name)))
    plain_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, (str, torch.device)) and _is_cuda_device(a) else a for a in args)
        return plain_to(self, *args, **_cpu_kwargs(kwargs))

    torch.Tensor.to = to
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


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
        setattr(cuda, name, _own(fn))
        setattr(cuda.random, name, _own(fn))
    cuda.default_generators = (torch.default_generator,)
    torch._C._cuda_setRNGState = _own(_set_cpu_rng_state)

    for name in ("set_device", "synchronize", "empty_cache", "reset_peak_memory_stats",
                 "reset_max_memory_allocated", "_lazy_init", "init"):
        setattr(cuda, name, _own(lambda *args, **kwargs: None))
    for name in ("current_device", "memory_allocated", "max_memory_allocated",
                 "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _own(lambda *args, **kwargs: 0))
    cuda.Stream = _FakeStream
    cuda.Event = _FakeStream
    cuda.current_stream = _own(lambda *args, **kwargs: _FakeStream())
    cuda.default_stream = _own(lambda *args, **kwargs: _FakeStream())
    cuda.stream = _own(lambda *args, **kwargs: contextlib.nullcontext())
    cuda.device = _own(lambda *args, **kwargs: contextlib.nullcontext())
    cuda.memory_stats = _own(lambda *args, **kwargs: {})


def _patch_tensor_methods() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
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

    torch.Tensor.type = tensor_type


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mc_random

    # torch.cuda._lazy_call only queues callbacks until CUDA initialises, which never happens
    # here: the tracker's RNG states would silently never be set.
    mc_random._lazy_call = lambda callback: callback()
    mc_random.device_ctx_manager = lambda *args, **kwargs: contextlib.nullcontext()
    # The tracker warns that the CPU RNG moved inside its fork; here that is by design.
    logging.getLogger(mc_random.__name__).setLevel(logging.ERROR)

    # gloo's all_to_all_single wants split sizes as lists; the MoE alltoall dispatcher passes tensors.
    dist = torch.distributed
    plain_all_to_all_single = dist.all_to_all_single

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return plain_all_to_all_single(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    dist.all_to_all_single = all_to_all_single

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

    dist.all_gather = all_gather


def install_cpu_compat() -> None:
    """Make megatron-core run on a CPU-only host. Idempotent; refuses on CUDA hosts."""
    global _installed
    if _installed:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU compatibility layer must not be installed on a CUDA host")
    # `with torch.device(...)` keys on the original factory functions: let torch record them first.
    from torch.utils._device import _device_constructors

    _device_constructors()
    _patch_torch_cuda()
    _patch_tensor_methods()
    _patch_factories()
    _patch_megatron()
    # megatron compiles a few MoE helpers with torch.compile: on a CPU host that costs seconds of
    # C++ compilation per shape for nothing worth having.
    from torch import _dynamo

    _dynamo.config.disable = True
    _installed = True
