"""Seeding, and the random-number state a resumed run restores exactly."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator that drives shuffling and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _python_state() -> tuple[Any, ...]:
    """``random.getstate()`` with its 625 words as one tensor: pickled as one object, not 625 (a quarter of
    the objects in a small model's ``last.pt``, written every epoch)."""
    version, words, gauss = random.getstate()
    return version, torch.tensor(words, dtype=torch.int64), gauss


def _python_state_tuple(state: tuple[Any, ...]) -> tuple[Any, ...]:
    version, words, gauss = state
    return version, tuple(words.tolist() if isinstance(words, torch.Tensor) else words), gauss


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every random state of the process, as tensors and plain values (loads with ``weights_only``)."""
    np_state = np.random.get_state()
    return {
        "python": _python_state(), "torch": torch.get_rng_state(), "generator": gen.get_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(_python_state_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
