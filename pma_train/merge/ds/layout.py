"""DeepSpeed's checkpoint directory layout, read from file names alone.

`<root>/<tag>/` (DeepSpeed's default tag: `global_step<N>`) holds one checkpoint; `<root>/latest`
names the newest tag. In a tag directory, per model-parallel rank `mp`:
- ZeRO stage 1 / 2: `mp_rank_<mp>_model_states.pt` (the whole module in its training dtype, the
  parameter shapes, the counters) and, per data-parallel rank `dp`,
  `[bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt` (that rank's fp32 master partition, its
  optimizer moments, and where each parameter's fragment sits in the partition);
- ZeRO stage 3: `zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt` per rank (no parameter data) and
  the same optim_states files;
- a universal checkpoint (DeepSpeed's ds_to_universal): the model-states files of the checkpoint it
  was made from and, instead of the partition files, `zero/<parameter name>/fp32.pt` (the whole fp32
  master weight) beside its optimizer moments.
Tensor parallelism (an `mpu`) numbers the mp ranks. A pipeline-parallel run (DeepSpeed's
PipelineEngine; ZeRO 0 / 1 only) counts its stages as mp ranks too: its `mp_rank_<mp>_model_states.pt`
hold no module (`module` is None) and the module is in one file per layer of the whole model,
`layer_<LL>[-model_<tp>]-model_states.pt` (the layer's own state dict; `-model_<tp>` when the
topology has a tensor axis).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "deepspeed"
LATEST = "latest"
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
_STEP = re.compile(r"global_step(\d+)$")
UNIVERSAL_DIR = "zero"
UNIVERSAL_FP32 = "fp32.pt"
# Written beside the data by pma-merge (provenance, checksums) or by DeepSpeed (nothing else).
SIDE_FILES = frozenset({"pma_merge.json", "checksums.json"})


class DsLayoutError(ValueError):
    """A DeepSpeed checkpoint directory that is incomplete or laid out in a way this merge does not read."""


@dataclass
class DsCheckpoint:
    path: Path
    model_files: dict[tuple[int, int], str] = field(default_factory=dict)  # (mp, dp or -1) -> name
    optim_files: dict[tuple[int, int], str] = field(default_factory=dict)  # (mp, dp) -> name
    layer_files: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (layer, tensor rank)
    universal: bool = False  # fp32 weights in zero/<name>/fp32.pt, no optim_files

    @property
    def zero3(self) -> bool:
        return any(dp >= 0 for _, dp in self.model_files)

    @property
    def dp_size(self) -> int:
        return len({dp for _, dp in self.optim_files})

    @property
    def mp_size(self) -> int:
        return len({mp for mp, _ in self.model_files})

    def describe(self) -> str:
        if self.universal:
            return "a universal checkpoint"
        return f"ZeRO-{'3' if self.zero3 else '1/2'} files of DP={self.dp_size} MP={self.mp_size}"

    def universal_file(self, name: str) -> Path:
        return self.path / UNIVERSAL_DIR / name / UNIVERSAL_FP32

    def model_file(self, mp: int) -> str:
        """The model_states file holding this mp rank's parameter shapes (dp rank 0's under ZeRO-3)."""
        return self.model_files[(mp, 0)] if self.zero3 else self.model_files[(mp, -1)]


def is_ds_tag(path: Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    names = [p.name for p in path.iterdir()]
    return any(_OPTIM.match(n) for n in names) or (
        UNIVERSAL_DIR in names and any(_MODEL.match(n) or _ZERO3_MODEL.match(n) for n in names))


def is_ds_root(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / LATEST).is_file() or any(is_ds_tag(p) for p in path.iterdir() if p.is_dir()))


def step_of(tag_dir: Path) -> int | None:
    """The global step in a tag's name (DeepSpeed's default tags), else None."""
    match = _STEP.search(Path(tag_dir).name)
    return int(match.group(1)) if match else None


def read_latest(root: Path) -> str | None:
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    try:
        tag = latest.read_bytes().decode("utf-8").strip()
    except (UnicodeDecodeError, OSError) as err:
        raise DsLayoutError(f"{latest} cannot be read as a tag name: {err}") from None
    if not tag or "/" in tag or tag in (".", ".."):
        raise DsLayoutError(f"{latest} holds {tag!r}, not a tag name")
    return tag


def resolve_tag(path: Path) -> Path:
    """A tag directory from itself or from a root (the tag its `latest` names)."""
    path = Path(path)
    if is_ds_tag(path):
        return path
    tag = read_latest(path)
    if tag is None:
        raise DsLayoutError(f"{path} is neither a DeepSpeed tag directory nor a root with a `latest` file")
    if not is_ds_tag(path / tag):
        raise DsLayoutError(f"{path / LATEST} names tag {tag!r}, but {path / tag} is not a DeepSpeed checkpoint "
                            f"({'missing' if not (path / tag).exists() else 'no *_optim_states.pt in it'})")
    return path / tag


def list_tags(root: Path) -> list[Path]:
    """The tag directories under a root, oldest first by the step in their names; a tag without
    one cannot be ordered: named."""
    tags = [p for p in Path(root).iterdir() if not p.name.startswith(".") and is_ds_tag(p)]
    unordered = [p.name for p in tags if step_of(p) is None]
    if unordered:
        raise DsLayoutError(f"{root}: tags {unordered[:3]} carry no global_step<N> in their names: list the "
                            "inputs explicitly")
    return sorted(tags, key=step_of)


def scan(tag_dir: Path) -> DsCheckpoint:
    """The files of one tag directory; DsLayoutError for a missing partition or model-states file."""
    ckpt, others = DsCheckpoint(Path(tag_dir)), []
    for path in sorted(Path(tag_dir).iterdir()):
        name = path.name
        if (m := _OPTIM.match(name)):
            ckpt.optim_files[(int(m.group(3)), int(m.group(2)))] = name
        elif (m := _MODEL.match(name)):
            ckpt.model_files[(int(m.group(1)), -1)] = name
        elif (m := _ZERO3_MODEL.match(name)):
            ckpt.model_files[(int(m.group(2)), int(m.group(1)))] = name
        elif (m := _LAYER.match(name)):
            ckpt.layer_files[name] = (int(m.group(1)), int(m.group(2) or 0))
        elif name == UNIVERSAL_DIR and path.is_dir():
            ckpt.universal = True
        elif name not in SIDE_FILES:
            others.append(name)
    if others:
        raise DsLayoutError(f"{tag_dir}: files this merge does not read: {others[:4]} (expert (MoE) files and "
                            "NVMe-offloaded tensors are not supported here)")
    if ckpt.universal:
        return _check_universal(ckpt)
    mps = sorted({mp for mp, _ in ckpt.optim_files})
    dps = sorted({dp for _, dp in ckpt.optim_files})
    if not mps:
        raise DsLayoutError(f"{tag_dir}: no *_optim_states.pt: not a DeepSpeed ZeRO checkpoint")
    for mp in range(mps[-1] + 1):  # ranks beyond the last present: plan.py, from the recorded DP size
        for dp in range(dps[-1] + 1):
            if (mp, dp) not in ckpt.optim_files:
                raise DsLayoutError(f"{tag_dir}: partition file of data-parallel rank {dp}, model-parallel rank "
                                    f"{mp} is missing (*zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt)")
    for mp in mps:
        wanted = [(mp, dp) for dp in dps] if ckpt.zero3 else [(mp, -1)]
        for key in wanted:
            if key not in ckpt.model_files:
                name = (f"zero_pp_rank_{key[1]}_mp_rank_{mp:02d}_model_states.pt" if ckpt.zero3
                        else f"mp_rank_{mp:02d}_model_states.pt")
                raise DsLayoutError(f"{tag_dir}: {name} is missing")
    # Pipeline x tensor parallel: which stage's partitions hold a layer's shard is not recorded in the
    # files; not produced for a test on CPU either. DeepSpeed's pipeline refuses ZeRO-3.
    if ckpt.layer_files and len({tp for _, tp in ckpt.layer_files.values()}) > 1:
        raise DsLayoutError(f"{tag_dir}: pipeline layer files of several tensor-parallel ranks (pipeline x tensor "
                            "parallel, layer_<LL>-model_<tp>-...): a layout this merge does not read")
    if ckpt.layer_files and ckpt.zero3:
        raise DsLayoutError(f"{tag_dir}: pipeline layer files beside ZeRO-3 model states: a layout this merge "
                            "does not read")
    return ckpt


def _check_universal(ckpt: DsCheckpoint) -> DsCheckpoint:
    """A universal checkpoint: the model-states file naming the parameters, no partition files."""
    if ckpt.optim_files:
        raise DsLayoutError(f"{ckpt.path}: both a universal checkpoint ({UNIVERSAL_DIR}/) and partition files "
                            f"({sorted(ckpt.optim_files.values())[:2]}): which one is the checkpoint?")
    if not ckpt.model_files:
        raise DsLayoutError(f"{ckpt.path}: a universal checkpoint ({UNIVERSAL_DIR}/) without the model-states "
                            "file that names its parameters (*model_states.pt)")
    if ckpt.mp_size != 1:
        raise DsLayoutError(f"{ckpt.path}: a universal checkpoint of a model-parallel run (MP={ckpt.mp_size}): "
                            "its parameters are whole, this merge does not slice them for tensor parallelism")
    return ckpt
