"""Inputs computed from formulas (no random numbers) for the legacy run fixtures: the fixture script
(``tests/fixtures/make_legacy_runs.py``) and ``tests/test_legacy_runs.py`` build the same files."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def _pattern(shape: tuple[int, ...], k: int) -> np.ndarray:
    """A deterministic 0-255 image: a ramp plus a bright square whose size depends on ``k``."""
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    img = (sum(g * (j + 1) for j, g in enumerate(grids)) * (7 + k)) % 60
    lo, hi = 4 + k % 3, 4 + k % 3 + 2 * k
    img[tuple(slice(lo, min(hi, n)) for n in shape)] += 150
    return img.astype(np.uint8)


def classification_inputs_2d(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.fromarray(_pattern((28, 28), k)).save(folder / f"img_{k}.png")
    return folder


def classification_inputs_3d(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        nib.save(nib.Nifti1Image(_pattern((16, 16, 16), k).astype(np.float32), np.eye(4)), str(folder / f"vol_{k}.nii.gz"))
    return folder


def segmentation_input(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two boxes (labels 1 and 2) whose intensity is 100 × label over a deterministic ramp."""
    shape = (16, 16, 8)
    label = np.zeros(shape, np.uint8)
    x0, y0 = 1 + k % 4, 1 + (k * 3) % 4
    label[x0:x0 + 6, y0:y0 + 5, 2:6] = 1
    label[x0 + 6:x0 + 10, y0:y0 + 5, 2:6] = 2
    ramp = np.indices(shape).sum(0) % 7
    image = (label * 100.0 + ramp * 3.0 + 50).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 20.0], [0, 1.0, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
    return image, label, affine
