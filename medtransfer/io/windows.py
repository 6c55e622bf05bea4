"""The VOI window functions, named CT windows and window stacks (several windows as image channels).

A window is ``(center, width)`` in Hounsfield units, applied with the DICOM linear VOI function
(:func:`apply_window`) to give ``[0, 1]``. Stacking three windows gives the
three channels an ImageNet backbone expects, without touching its first convolution (the
fastai ``medical.imaging`` approach).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from medtransfer._suggest import did_you_mean
from medtransfer.errors import ConfigError

# (center, width) in HU; common radiology reading windows.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "temporal_bone": (600.0, 2800.0),
    "head_soft_tissue": (40.0, 380.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "spine_bone": (300.0, 1500.0),
    "angio": (300.0, 600.0),
}

# Channel stacks for 3-channel (ImageNet) backbones.
WINDOW_STACKS: dict[str, tuple[str, ...]] = {
    "chest": ("lung", "mediastinum", "bone"),
    "head": ("brain", "subdural", "bone"),
    "abdomen": ("liver", "soft_tissue", "bone"),
}

WindowSpec = Union[str, tuple[float, float]]


def apply_window(array: np.ndarray, center: float, width: float, *, invert: bool = False) -> np.ndarray:
    """The DICOM linear VOI function (PS3.3 C.11.2.1.2.1) on ``[0, 1]``, as float32.

    Values ≤ ``center - 0.5 - (width - 1) / 2`` give 0, values > ``center - 0.5 + (width - 1) / 2`` give 1,
    linear in between; width 1, the narrowest legal window, is the step at ``center - 0.5`` (widths below
    1 are taken as 1). ``invert`` returns ``1 - f`` (the MONOCHROME1 presentation), with the step's
    boundary value on the same side. Computed in float64, so narrow windows on large values stay exact.
    """
    width = max(float(width), 1.0)
    x = np.asarray(array)
    if width == 1.0:
        above = x > center - 0.5
        return (~above if invert else above).astype(np.float32)
    out = (x.astype(np.float64, copy=False) - (center - 0.5 - (width - 1) / 2)) / (width - 1)
    if invert:
        np.subtract(1.0, out, out=out)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32)


def percentile_window(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale ``array`` to ``[0, 1]`` between two percentiles (robust to outlier pixels)."""
    a, b = np.percentile(array, [low, high])
    if b <= a:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array.astype(np.float32) - np.float32(a)) / np.float32(b - a), 0.0, 1.0)


def window_by_name(name: str) -> tuple[float, float]:
    """``(center, width)`` of a named window; unknown names raise with the closest match."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in WINDOWS:
        return WINDOWS[key]
    raise ConfigError(
        f"Unknown CT window '{name}'.{did_you_mean(key, WINDOWS)} Known windows: {', '.join(sorted(WINDOWS))}; "
        "or pass (center, width)."
    )


def resolve_window(spec: WindowSpec, meta: Mapping[str, Any] | None = None) -> tuple[float, float]:
    """A window given as a name, ``"tags"`` (the image's WindowCenter/Width from ``meta``) or a pair."""
    if isinstance(spec, str):
        if spec == "tags":
            c = meta.get("window_center") if meta else None
            w = meta.get("window_width") if meta else None
            if c is None or not w:
                raise ConfigError("Window 'tags' asked for, but the image has no WindowCenter/WindowWidth; use a named window.")
            return float(c), float(w)
        return window_by_name(spec)
    center, width = spec
    return float(center), float(width)


def stack_windows(
    hu: np.ndarray, names: Sequence[WindowSpec] | str = "chest", meta: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Apply several windows to one image in HU and stack them: ``(C, *hu.shape)`` float32 in ``[0, 1]``.

    ``names`` is a sequence of window names / ``(center, width)`` pairs / ``"tags"`` (needs
    ``meta`` from :func:`~medtransfer.io.read_dicom`), or one key of :data:`WINDOW_STACKS`.
    """
    if isinstance(names, str):
        if names not in WINDOW_STACKS:
            raise ConfigError(
                f"Unknown window stack '{names}'.{did_you_mean(names, WINDOW_STACKS)} "
                f"Known stacks: {', '.join(sorted(WINDOW_STACKS))}; or pass a list of window names."
            )
        names = WINDOW_STACKS[names]
    if len(names) == 0:
        raise ConfigError("stack_windows needs at least one window.")
    hu = np.asarray(hu, dtype=np.float32)
    return np.stack([apply_window(hu, *resolve_window(n, meta)) for n in names]).astype(np.float32, copy=False)
