"""The random state a resumed run restores: every generator draws the same numbers after a save/load."""
from __future__ import annotations

import io
import random

import numpy as np
import torch

from medtransfer.utils.rng import rng_state, seed_everything, set_rng_state


def _draws(gen: torch.Generator) -> tuple:
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(torch.rand(1)),
            float(torch.rand(1, generator=gen)))


def test_state_saved_with_weights_only_restores_every_generator():
    gen = seed_everything(3)
    random.gauss(0, 1)  # leaves a cached gauss value in Python's state
    buf = io.BytesIO()
    torch.save(rng_state(gen), buf)
    expected = _draws(gen)
    _draws(gen)  # move every generator on
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True), gen)
    assert _draws(gen) == expected


def test_python_state_is_one_tensor_and_the_older_tuple_form_still_loads():
    gen = seed_everything(4)
    state = rng_state(gen)
    assert isinstance(state["python"][1], torch.Tensor) and state["python"][1].numel() == 625
    old = {**state, "python": random.getstate()}  # last.pt written before the tensor form
    expected = _draws(gen)
    set_rng_state(old, gen)
    assert _draws(gen) == expected
