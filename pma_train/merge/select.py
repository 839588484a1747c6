"""Which checkpoints to merge: explicit directories, or the last N of a root spaced V tokens apart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pma_train.checkpoint import layout, sidecar
from pma_train.checkpoint.layout import CheckpointError
from pma_train.merge.ds import layout as ds  # detection only: filesystem, no torch


class SelectionError(ValueError):
    pass


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    iteration: int
    consumed_tokens: int | None
    format: str = "torch_dist"  # or ds.FORMAT: a DeepSpeed tag directory


def describe(path: str | Path, seq_length: int | None = None) -> CheckpointInfo:
    """A checkpoint's iteration and consumed tokens (from pma-train's side-car, else Megatron-LM args);
    a DeepSpeed tag directory (or root) is recognised by its partition files (`seq_length`: see
    _describe_deepspeed)."""
    if _is_deepspeed(Path(path)):
        return _describe_deepspeed(Path(path), seq_length=seq_length)
    ckpt = layout.resolve_checkpoint(path)
    progress = sidecar.read_progress(ckpt)
    if progress is not None:
        return CheckpointInfo(ckpt, *progress)
    iteration = layout.iteration_of(ckpt)
    tokens = _megatron_tokens(ckpt)
    return CheckpointInfo(ckpt, iteration if iteration is not None else -1, tokens)


def _is_deepspeed(path: Path) -> bool:
    return ds.is_ds_tag(path) or (not layout.is_checkpoint_dir(path) and not layout.list_iterations(path)
                                  and ds.is_ds_root(path))


def _describe_deepspeed(path: Path, scan: bool = True, seq_length: int | None = None) -> CheckpointInfo:
    """A DeepSpeed tag's step: from its name (DeepSpeed's global_step<N>), else its recorded global_steps.
    DeepSpeed counts samples, not tokens: with the run's `seq_length`, tokens = its recorded
    global_samples x seq_length; without, tokens are unknown (v_tokens is refused by name).
    `scan`: its files checked complete now (a root's tags: only those selected, by verify_deepspeed)."""
    try:
        tag = ds.resolve_tag(path)
        if scan:
            ds.scan(tag)
    except ds.DsLayoutError as err:
        raise CheckpointError(str(err)) from None
    step, tokens = ds.step_of(tag), None
    if step is None or seq_length is not None:
        from pma_train.merge.ds.archive import Archive, ArchiveError  # torch: only when the name is not enough

        try:
            states = Archive(tag / ds.scan(tag).model_file(0)).objects
            step = int(states["global_steps"]) if step is None else step
            tokens = int(states["global_samples"]) * seq_length if seq_length is not None else None
        except (ArchiveError, ds.DsLayoutError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{tag}: no global_steps / global_samples in its model states ({err})") from None
    return CheckpointInfo(tag, step, tokens, ds.FORMAT)


def verify_deepspeed(info: CheckpointInfo) -> None:
    """A selected DeepSpeed input's files complete (its pickles are vetted as the merge indexes them)."""
    try:
        ds.scan(info.path)
    except ds.DsLayoutError as err:
        raise CheckpointError(str(err)) from None


def _megatron_tokens(ckpt: Path) -> int | None:
    """consumed_train_samples * seq_length from a Megatron-LM checkpoint's args, if readable."""
    if not (ckpt / "metadata.json").is_file() and not (ckpt / "common.pt").is_file():
        return None  # not written by megatron-core: no args to read
    layout.verify_complete(ckpt)  # every pickle vetted before any is read
    # Imported here: it needs torch (the DCP metadata), which a selection from side-cars never does.
    from pma_train.checkpoint.common_state import read_common_state

    try:
        args = read_common_state(ckpt).get("args")
    except Exception:  # not a megatron checkpoint, or unreadable common state: tokens unknown
        return None
    if args is None or not hasattr(args, "consumed_train_samples"):
        return None
    return int(args.consumed_train_samples) * int(getattr(args, "seq_length", 0))


def checkpoints_of(root: str | Path, seq_length: int | None = None) -> list[CheckpointInfo]:
    root = Path(root)
    if not root.is_dir():
        raise SelectionError(f"root: {root} is not a directory")
    if not layout.list_iterations(root) and ds.is_ds_root(root):
        try:
            ds.resolve_tag(root)  # a `latest` naming a missing tag is named, not skipped
            return [_describe_deepspeed(tag, scan=False, seq_length=seq_length) for tag in ds.list_tags(root)]
        except (ds.DsLayoutError, CheckpointError) as err:
            raise SelectionError(f"root: {err}") from None
    return [describe(root / layout.iter_dir_name(i)) for i in layout.list_iterations(root)]


def select_spaced(root: str | Path, n: int, v_tokens: int | None = None, v_iterations: int | None = None,
                  end_iteration: int | None = None, seq_length: int | None = None) -> list[CheckpointInfo]:
    """The newest checkpoint at or before end_iteration and the n-1 before it, spaced exactly V apart.

    With neither spacing given, the n most recent checkpoints. Oldest first.
    """
    available = checkpoints_of(root, seq_length)
    if end_iteration is not None:
        available = [c for c in available if c.iteration <= end_iteration]
    if not available:
        raise SelectionError(f"root: no checkpoints in {root}"
                             + (f" at or before iteration {end_iteration}" if end_iteration is not None else ""))
    if v_tokens is None and v_iterations is None:
        if len(available) < n:
            raise SelectionError(f"n: {n} checkpoints requested, {root} has {len(available)}")
        return available[-n:]
    use_tokens = v_tokens is not None
    if use_tokens and any(c.consumed_tokens is None for c in available):
        missing = next(c for c in available if c.consumed_tokens is None)
        hint = " (or seq_length=<the run's sequence length>: a DeepSpeed checkpoint records samples)"
        raise SelectionError(f"v_tokens: {missing.path} records no consumed tokens; use v_iterations"
                             + (hint if missing.format == ds.FORMAT else ""))
    position = (lambda c: c.consumed_tokens) if use_tokens else (lambda c: c.iteration)
    spacing = v_tokens if use_tokens else v_iterations
    by_position = {position(c): c for c in available}
    newest = available[-1]
    chosen = []
    for k in range(n - 1, -1, -1):
        target = position(newest) - k * spacing
        if target not in by_position:
            unit = "tokens" if use_tokens else "iterations"
            have = sorted(by_position)
            raise SelectionError(
                f"{'v_tokens' if use_tokens else 'v_iterations'}: no checkpoint at {target} {unit} "
                f"(n={n} spaced {spacing} back from {position(newest)}); checkpoints are at {have[:20]}"
                f"{' ...' if len(have) > 20 else ''}")
        chosen.append(by_position[target])
    return chosen


def resolve_inputs(paths: list[str], seq_length: int | None = None) -> list[CheckpointInfo]:
    """The checkpoints of explicit inputs, in the order listed; each at most once."""
    infos = []
    for path in paths:
        try:
            infos.append(describe(path, seq_length))
        except CheckpointError as err:
            raise SelectionError(f"inputs: {err}") from None
    _refuse_duplicates(paths, infos)
    _refuse_mixed_formats(paths, infos)
    return infos


def _refuse_mixed_formats(paths: list[str], infos: list[CheckpointInfo]) -> None:
    formats = {info.format for info in infos}
    if len(formats) > 1:
        listed = "; ".join(f"{given}: {info.format}" for given, info in zip(paths, infos))
        raise SelectionError(f"inputs: checkpoints of different formats do not merge together ({listed}); "
                             "merge each format on its own")


def _refuse_duplicates(paths: list[str], infos: list[CheckpointInfo]) -> None:
    # A root and its latest iter_* dir, or two symlinked paths, name one checkpoint: weighted twice.
    seen: dict[Path, str] = {}
    for given, info in zip(paths, infos):
        real = info.path.resolve()
        if real in seen:
            raise SelectionError(f"inputs: {seen[real]} and {given} are the same checkpoint ({real}); "
                                 "list each checkpoint once")
        seen[real] = given


def sort_oldest_first(infos: list[CheckpointInfo], weights: list[float]) -> tuple[list[CheckpointInfo], list[float], bool]:
    """Inputs by (iteration, tokens), as merges need them: the output takes the newest one's
    iteration, and positional weights (ema, wma, decay) count from the oldest. Explicit weights
    move with the input they were listed with. Returns (inputs, weights, whether the order changed)."""
    if weights and len(weights) != len(infos):
        raise SelectionError(f"weights: {len(weights)} weights for {len(infos)} inputs")
    order = sorted(range(len(infos)), key=lambda i: (infos[i].iteration, infos[i].consumed_tokens or 0))
    return ([infos[i] for i in order], [weights[i] for i in order] if weights else [],
            order != list(range(len(infos))))
