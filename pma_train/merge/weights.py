"""Merge weights for N checkpoints, oldest first (PMA.md): SMA, EMA, WMA, or explicit."""

from __future__ import annotations

import math


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
                  normalize: bool = True, allow_negative: bool = False) -> list[float]:
    if method == "sma":
        return sma(n)
    if method == "ema":
        return check(ema(n, alpha))
    if method == "wma":
        return wma(n)
    if method == "explicit":
        explicit = list(explicit or [])
        if len(explicit) != n:
            raise WeightError(f"{len(explicit)} weights for {n} checkpoints")
        return check(explicit, normalize, allow_negative)
    raise WeightError(f"unknown merge method '{method}'")
