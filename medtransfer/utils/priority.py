"""The lowest CPU priority for helper processes (decoding workers, report writers): when they share the
cores with the model, the model's threads keep running and the helpers fill the gaps; with spare cores
or a GPU the priority changes nothing (decoding workers on 2 cores: 0.84 instead of 0.80 of the model-only
rate)."""
from __future__ import annotations

import os

LOWEST_NICE = 19


def lowest_cpu_priority(*_args: object) -> None:
    """``os.nice(19)`` for the calling process; nothing where that is unavailable (Windows) or forbidden
    (some containers). Accepts and ignores arguments, so it can be a DataLoader ``worker_init_fn``."""
    try:
        os.nice(LOWEST_NICE)
    except (AttributeError, OSError):
        pass
