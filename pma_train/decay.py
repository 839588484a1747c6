"""Decay shapes: the LR curves a schedule decays along, under the names configs give them.

One registry for the WSD schedule and annealing branches (schedule.py, as megatron-core's
`lr_wsd_decay_style`), the decay-emulating merge (merge/weights.py, from the curve) and the
validation of both (config/checks.py). Imports nothing of ours: every layer may use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class DecayShape:
    # megatron-core's name for it (OptimizerParamScheduler's lr_wsd_decay_style).
    megatron_style: str
    # The LR on [0, 1]: 1 at the start of the decay, 0 at its end; None where megatron's shape has no
    # such closed form (exponential decays towards min_lr without reaching 0).
    curve: Optional[Callable[[float], float]] = None

    def __call__(self, u: float) -> float:
        return self.curve(u)


DECAY_SHAPES = {
    "linear": DecayShape("linear", lambda u: 1.0 - u),
    "cosine": DecayShape("cosine", lambda u: 0.5 * (1.0 + math.cos(math.pi * u))),
    "1-sqrt": DecayShape("minus_sqrt", lambda u: 1.0 - math.sqrt(u)),
    "exponential": DecayShape("exponential"),
}

# The shapes with a curve: what a merge can emulate, and what an annealing branch decays along.
CURVE_SHAPES = tuple(name for name, shape in DECAY_SHAPES.items() if shape.curve is not None)
