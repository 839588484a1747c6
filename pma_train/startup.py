"""Start-up cost of importing megatron-core, paid once per process (every rank of every job).

megatron-core decorates a dozen fusion helpers with `torch.compile` while `megatron.core` is
imported; each decoration imports torch's dynamo and inductor stacks (~5 s of CPU per process),
whether or not the helper is ever called (fusions are off on CPU, and dynamo is disabled there).
While `megatron.core` executes, `torch.compile` is replaced by a version that compiles on the first
call instead: the same function, the same compiled code, the cost paid only by processes that call it.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
import types


def _compile_on_first_call(compile_now):
    def compile(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: compile(fn, **options)
        if not isinstance(model, types.FunctionType):
            return compile_now(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return call

    return compile


class _DeferredCompileLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        import torch

        compile_now = torch.compile
        torch.compile = _compile_on_first_call(compile_now)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = compile_now


class _MegatronFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)  # once: later imports see the plain import system
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferredCompileLoader(spec.loader)
        return spec


def install() -> None:
    """Defer megatron-core's import-time compilations (before megatron.core is imported)."""
    if "megatron.core" not in sys.modules and not any(isinstance(f, _MegatronFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronFinder())
