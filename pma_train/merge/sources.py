"""What each output tensor of a merge is computed from, input by input.

A carried optimizer state holds the fp32 main parameters (the distributed optimizer's `param`
entries, `fp32_param` in other megatron formats), and a resume copies them over the model
weights (in fp32 they are the model weights' very storage; in mixed precision the next step
writes them back). So when the optimizer is carried, the main parameters must be the merge too:
they are averaged from the inputs' main parameters, the exact fp32 weights of a mixed-precision
run (an input without them contributes its model weights), and the model weights of the output
are that same average cast to their dtype, as a training step would cast them. Moments and
everything else of the optimizer come from the newest input.
"""

from __future__ import annotations

from dataclasses import dataclass

from pma_train.checkpoint.layout import is_optimizer_key
from pma_train.merge.dcp_io import CheckpointIndex
from pma_train.merge.plan import PlanError

MAIN_PARAM_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


@dataclass(frozen=True)
class Source:
    keys: tuple[str, ...]  # the key read from each input, oldest first
    merge: bool  # weighted sum of the inputs; else a copy of the newest input


def main_param_key(index: CheckpointIndex, model_key: str) -> str | None:
    """The optimizer entry holding this model weight's fp32 main parameter, if the checkpoint has one."""
    for prefix in MAIN_PARAM_PREFIXES:
        if prefix + model_key in index.tensors:
            return prefix + model_key
    return None


def _model_key_of(optimizer_key: str) -> str | None:
    for prefix in MAIN_PARAM_PREFIXES:
        if optimizer_key.startswith(prefix):
            return optimizer_key[len(prefix):]
    return None


def _from_main_params(indexes: list[CheckpointIndex], model_key: str) -> tuple[str, ...]:
    return tuple(main_param_key(index, model_key) or model_key for index in indexes)


def plan_sources(indexes: list[CheckpointIndex], keys: list[str], carry_optimizer: bool) -> dict[str, Source]:
    """For every output key: what to read from each input, and whether to merge or copy."""
    newest = indexes[-1]
    sources = {}
    for key in keys:
        if is_optimizer_key(key):
            model_key = _model_key_of(key)
            if model_key is not None and model_key in newest.tensors:
                sources[key] = Source(_from_main_params(indexes, model_key), merge=True)
            else:
                sources[key] = Source((key,) * len(indexes), merge=False)
        elif carry_optimizer and main_param_key(newest, key) is not None:
            sources[key] = Source(_from_main_params(indexes, key), merge=True)
        else:
            sources[key] = Source((key,) * len(indexes), merge=True)
    _check_shapes(indexes, sources)
    return sources


def _check_shapes(indexes: list[CheckpointIndex], sources: dict[str, Source]) -> None:
    problems = []
    for key, source in sources.items():
        if not source.merge:  # copied from the newest input, which holds it
            continue
        shape = indexes[-1].tensors[key].shape
        for index, read in zip(indexes, source.keys):
            entry = index.tensors.get(read)
            if entry is None or entry.shape != shape:
                found = "missing" if entry is None else f"{tuple(entry.shape)}"
                problems.append(f"{index.dir}: {read} is {found}, the output {key} is {tuple(shape)}")
    if problems:
        raise PlanError("inputs differ:\n  " + "\n  ".join(problems[:8]))
