"""Parameter counts read off the real megatron-core model, built on the meta device.

One process stands in for the whole cluster: torch's fake process group gives it any rank of any
world, megatron-core's parallel state is initialised for the job's TP / PP / VPP / EP layout, and
pma-train's own `build_model` builds the chunks of the first rank of a pipeline stage with every
tensor on the meta device (shapes, no memory). Module shapes do not depend on the data-parallel
size, so the world used here is the smallest that holds the layout (tp*pp*ep).

Every count is a sum of the `numel()` of real parameters. By default each chunk is built with one
layer of each kind the model uses ('*' attention, '-' MLP, 'E' MoE), and a chunk's count is its
stage-level modules (embedding, final norm, output layer) plus, for each kind, that layer's count
times how often the kind occurs in the chunk's real segment of the pattern: layers of one kind have
the same parameters wherever they sit. Such builds of the middle stages are all alike, so only the
first, the last and one middle stage are built, and a 200B MoE takes about a second. `full=True`
builds every layer of every stage (what the trainer builds): the same numbers, slower.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pma_train.config import JobConfig

if TYPE_CHECKING:
    from pma_train.model.flops import Tally

# pma_train.model (its parameter tally included) is imported inside the functions that count: importing
# it loads megatron-core, which `pma-plan --help` and a config error need not wait for.


@dataclass
class ChunkCount:
    """One model chunk of the first rank of a pipeline stage."""

    pp_rank: int
    vp_stage: int | None
    segment: str  # its layers, in the pattern's symbols
    first: bool  # holds the embedding
    last: bool  # holds the final norm and output layer
    params: Tally


@dataclass
class ModelCount:
    chunks: list[ChunkCount]
    layers: dict[str, Tally]  # one layer of each kind: '*' attention, '-' MLP, 'E' MoE
    embedding: Tally  # input embedding (the output layer too when tied)
    output: Tally  # final norm + output layer (a tied copy on the last stage counts locally only)
    padded_vocab_size: int
    expert_tensor_parallel: int
    full_build: bool
    total: Tally = field(init=False)

    def __post_init__(self) -> None:
        from pma_train.model.flops import Tally

        self.total = Tally()
        for chunk in self.chunks:
            self.total.add(chunk.params)


class BuildError(RuntimeError):
    """megatron-core refused to build the model (a shape its modules do not support)."""


def layer_kinds(pattern: str) -> str:
    """The distinct layer symbols of a pattern, in order of first appearance."""
    return "".join(dict.fromkeys(pattern.replace("|", "")))


def count_model(cfg: JobConfig, vocab_size: int, full: bool = False) -> ModelCount:
    """Build the job's model on the meta device, one rank per pipeline stage, and count it."""
    from pma_train.model.build import staged_pattern
    from pma_train.model.flops import Tally

    p = cfg.parallel
    vpp = p.vpp or 1
    segments = staged_pattern(cfg.model, p.pp * vpp).split("|")
    kinds = layer_kinds(cfg.model.pattern())
    build_cfg = cfg
    if not full:
        # Every chunk gets one layer of each kind (equal segments keep megatron's divisibility checks happy).
        build_cfg = copy.deepcopy(cfg)
        build_cfg.model.layer_pattern = "|".join([kinds] * (p.pp * vpp))

    tied = not cfg.model.untie_embeddings_and_output_weights
    chunks: list[ChunkCount] = []
    layers: dict[str, Tally] = {}
    embedding, output = Tally(), Tally()
    built: dict[object, list[_Chunk]] = {}
    with quiet(), meta_build_environment():
        for pp_rank in range(p.pp):
            # Reduced builds of the middle stages are identical: build one of them.
            key = pp_rank if full or pp_rank in (0, p.pp - 1) else "middle"
            if key not in built:
                with fake_rank(cfg, pp_rank):
                    built[key] = [_Chunk.of(module, p.tp, p.ep, tied, full) for module in build_chunks(build_cfg, vocab_size)]
            for vp, chunk in enumerate(built[key]):
                segment = segments[vp * p.pp + pp_rank]
                for symbol, tally in chunk.per_layer.items():
                    layers.setdefault(symbol, tally)
                params = Tally()
                params.add(chunk.head)
                params.add(chunk.tail)
                if full:
                    for tally in chunk.every_layer:
                        params.add(tally)
                else:
                    for symbol in kinds:
                        params.add(chunk.per_layer[symbol], segment.count(symbol))
                chunks.append(ChunkCount(pp_rank, vp if p.vpp else None, segment, chunk.first, chunk.last, params))
                embedding.add(chunk.head)
                output.add(chunk.tail)
    first = next(iter(built.values()))[0]
    padded = max(c.padded_vocab for cs in built.values() for c in cs)
    return ModelCount(chunks=chunks, layers=layers, embedding=embedding, output=output,
                      padded_vocab_size=padded, expert_tensor_parallel=first.expert_tp, full_build=full)


@dataclass
class _Chunk:
    """What counting needs of one built chunk (the modules themselves are dropped)."""

    head: Tally  # embedding
    tail: Tally  # final norm + output layer
    per_layer: dict[str, Tally]  # one layer of each kind
    every_layer: list[Tally]  # full builds: every layer
    first: bool
    last: bool
    padded_vocab: int
    expert_tp: int

    @classmethod
    def of(cls, module, tp: int, ep: int, tied: bool, full: bool) -> "_Chunk":
        etp = module.config.expert_tensor_parallel_size or tp
        head, tail, per_layer = _tally_chunk(module, tp, ep, etp, tied)
        every = _tally_layers(module, tp, ep, etp, tied) if full else []
        return cls(head, tail, per_layer, every, module.pre_process, module.post_process, _padded_vocab(module), etp)


# ----------------------------------------------------------------------------- counting


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _split_layers(module) -> tuple[list, dict[int, list]]:
    stage, by_layer = [], {}
    for name, param in module.named_parameters():
        match = _LAYER.match(name)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append((name, param))
        else:
            stage.append((name, param))
    return stage, by_layer


def _tally_chunk(module, tp: int, ep: int, etp: int, tied: bool) -> tuple[Tally, Tally, dict[str, Tally]]:
    """(embedding, final norm + output layer, one layer of each kind) of a built chunk."""
    from pma_train.model.flops import Tally, tally

    stage, by_layer = _split_layers(module)
    types = module.decoder.layer_type_list
    per_layer: dict[str, Tally] = {}
    for index, named in sorted(by_layer.items()):
        per_layer.setdefault(types[index], tally(named, tp, ep, etp, tied))
    for symbol in types:  # a kind without parameters still counts (as zero)
        per_layer.setdefault(symbol, Tally())
    head = [(name, param) for name, param in stage if name.startswith("embedding.")]
    tail = [(name, param) for name, param in stage if not name.startswith("embedding.")]
    return tally(head, tp, ep, etp, tied), tally(tail, tp, ep, etp, tied), per_layer


def _tally_layers(module, tp: int, ep: int, etp: int, tied: bool) -> list[Tally]:
    from pma_train.model.flops import tally

    _, by_layer = _split_layers(module)
    return [tally(named, tp, ep, etp, tied) for _, named in sorted(by_layer.items())]


def _padded_vocab(module) -> int:
    if module.pre_process:
        return module.embedding.word_embeddings.num_embeddings
    if module.post_process and module.output_layer is not None:
        return module.output_layer.output_size
    return 0


# ----------------------------------------------------------------------------- building


def build_chunks(cfg: JobConfig, vocab_size: int) -> list:
    from pma_train.model.build import build_model
    from pma_train.platform import Platform

    # The local (non-TE) layer spec: same parameters as Transformer Engine's, and buildable anywhere.
    platform = Platform(torch.device("meta"), "fake")
    try:
        with torch.device("meta"):
            return build_model(cfg, platform, vocab_size, initialise=False)
    except (AssertionError, ValueError, RuntimeError) as err:
        raise BuildError(f"megatron-core cannot build this model: {err}") from err


@contextlib.contextmanager
def meta_build_environment():
    """megatron-core buildable on this host (on the meta device) for the duration of the block only:
    pma-plan also runs inside other processes (tests, notebooks) that must not stay patched."""
    if torch.cuda.is_available():
        yield
        return
    from pma_train import cpu_compat

    with cpu_compat.installed():
        yield


@contextlib.contextmanager
def fake_rank(cfg: JobConfig, pp_rank: int):
    """This process as the first rank of pipeline stage `pp_rank` of a fake world."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    p = cfg.parallel
    if dist.is_initialized():
        raise RuntimeError("pma-plan builds its own fake process group; torch.distributed is already initialised")
    world = p.tp * p.pp * p.ep
    rank = pp_rank * (world // p.pp)  # order tp-cp-ep-dp-pp: pp is the slowest-varying dimension
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            expert_model_parallel_size=p.ep,
            create_gloo_process_groups=False,
        )
        assert parallel_state.get_pipeline_model_parallel_rank() == pp_rank
        assert parallel_state.get_tensor_model_parallel_rank() == 0
        yield
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet():
    """megatron-core's per-stage INFO lines and deprecation warnings say nothing about a plan."""
    logger = logging.getLogger("megatron")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
