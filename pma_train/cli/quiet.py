"""A quiet start: the known third-party start-up messages, hidden unless `logging.verbose=true`.

megatron-core and torch announce, on every rank, that optional accelerators are absent (Transformer
Engine, Apex, absl), that APIs they call are deprecated or experimental, and that no CUDA runtime was
found: about twenty lines before pma-train's first, none of which a user can act on. Each is
filtered here by its message (and the package it comes from), at the entry points only: importing
pma_train as a library changes no warning filter or logger. Anything not listed still shows.
"""

from __future__ import annotations

import logging
import warnings

# (category, start of the message (a regex), module the warning is attributed to (a regex))
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\."),
    (UserWarning, r"Apex is not installed", r"megatron\."),
    (UserWarning, r"absl\.logging is not installed", r"megatron\."),
    (UserWarning, r"full scope is deprecated", r"megatron\."),  # megatron-core's own default
    (UserWarning, r"MimoModelConfig is experimental", r"megatron\."),
    # megatron-core's optimizer probes .grad of every parameter, leaf or not
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor", r"megatron\."),
    # megatron-core's gradient buffers call the old collective names
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
     r"torch\."),
)

# Loggers whose start-up warnings are noise on the machines pma-train runs on: torch warns, on a
# machine without a GPU, that it found no CUDA runtime (megatron-core imports torch.utils.cpp_extension).
NOISY_LOGGERS: dict[str, int] = {"torch.utils.cpp_extension": logging.ERROR}


def quiet_third_party() -> None:
    """Hide the known messages for the rest of this process (call before megatron-core is imported)."""
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
