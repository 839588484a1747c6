"""Merge weights for N checkpoints, oldest first (docs/pma.md): SMA, EMA, WMA, decay-emulating, or explicit."""

from __future__ import annotations

import math

from pma_train.decay import CURVE_SHAPES, DECAY_SHAPES


class WeightError(ValueError):
    pass


def sma(n: int) -> list[float]:
    return [1.0 / n] * n


def ema(n: int, alpha: float) -> list[float]:
    """Weights of M_avg(i) = alpha * M_i + (1 - alpha) * M_avg(i-1), M_avg(1) = M_1."""
    if n == 1:
        return [1.0]
    return [(1 - alpha) ** (n - 1)] + [alpha * (1 - alpha) ** (n - i) for i in range(2, n + 1)]


def wma(n: int) -> list[float]:
    """w_i proportional to i: the newest checkpoint weighs most."""
    total = n * (n + 1) / 2
    return [i / total for i in range(1, n + 1)]


def decay(n: int, shape: str) -> list[float]:
    """Weights whose average equals annealing the LR with `shape` over the merge window (WSM).

    With a constant LR, checkpoint i is M_0 - lr * (sum of the updates before it), so
    sum_i c_i M_i = M_0 - lr * sum_k w_k (updates of interval k), where interval k runs from
    checkpoint k-1 to k and w_k = c_k + ... + c_{n-1}. Choosing w_k = shape(k / n) (the window's
    LR falls from 1 towards 0, reaching 0 one spacing after the newest checkpoint) gives
    c_i = shape(i / n) - shape((i + 1) / n). Linear decay is exactly SMA; cosine and 1-sqrt
    weigh older checkpoints more, as their LR drops earlier.
    """
    if shape not in CURVE_SHAPES:
        raise WeightError(f"unknown decay_shape '{shape}' (one of {', '.join(CURVE_SHAPES)})")
    f = DECAY_SHAPES[shape].curve
    return [f(i / n) - f((i + 1) / n) for i in range(n)]


def check(weights: list[float], normalize: bool = True, allow_negative: bool = False) -> list[float]:
    """Validated (and, unless told otherwise, normalised) weights."""
    if not weights:
        raise WeightError("no weights")
    if not all(math.isfinite(w) for w in weights):
        raise WeightError(f"weights must be finite: {weights}")
    if not allow_negative and any(w < 0 for w in weights):
        raise WeightError(f"negative weights {weights} need allow_negative_weights=true")
    total = math.fsum(weights)
    if normalize:
        if abs(total) < 1e-12:
            raise WeightError(f"weights sum to 0, cannot normalise: {weights}")
        return [w / total for w in weights]
    if all(w == 0 for w in weights):
        raise WeightError("all weights are 0")
    return list(weights)


def merge_weights(method: str, n: int, alpha: float = 0.2, explicit: list[float] | None = None,
                  normalize: bool = True, allow_negative: bool = False, decay_shape: str = "linear") -> list[float]:
    if method == "sma":
        return sma(n)
    if method == "ema":
        return check(ema(n, alpha))
    if method == "wma":
        return wma(n)
    if method == "decay":
        return decay(n, decay_shape)
    if method == "explicit":
        explicit = list(explicit or [])
        if len(explicit) != n:
            raise WeightError(f"{len(explicit)} weights for {n} checkpoints")
        return check(explicit, normalize, allow_negative)
    raise WeightError(f"unknown merge method '{method}'")
