"""Look at a dataset and decide the recipe from the data itself (no dataset names anywhere).

``profile_npz`` reads a MedMNIST-style ``.npz`` (``{train,val,test}_{images,labels}``) and reports
what it holds: 2D grayscale, 2D colour or 3D volumes; binary, multi-class or multi-label targets;
sizes. ``recipe_overrides`` turns a profile into config overrides that fit a CPU time budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class DataProfile:
    """What a dataset holds, read from the arrays themselves."""

    dims: int
    """2 for images, 3 for volumes."""
    channels: int
    """1 (grayscale) or 3 (colour) for 2D; 1 for volumes."""
    image_shape: tuple[int, ...]
    task: str
    """``binary``, ``multiclass`` or ``multilabel``."""
    n_classes: int
    n_train: int
    n_val: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _task(labels: np.ndarray) -> tuple[str, int]:
    if labels.ndim == 2 and labels.shape[1] > 1:
        values = np.unique(labels)
        if not set(values.tolist()) <= {0, 1}:
            raise DataError(f"Label matrix with {labels.shape[1]} columns holds values {values[:10]}; "
                            "multi-label targets must be 0/1.")
        return "multilabel", labels.shape[1]
    n = int(labels.max()) + 1
    return ("binary" if n <= 2 else "multiclass"), max(n, 2)


def profile_npz(path: str | Path) -> DataProfile:
    """Profile a MedMNIST-style ``.npz`` without loading more than its headers and labels."""
    p = Path(path)
    try:
        npz = np.load(p, mmap_mode="r")
    except Exception as exc:
        raise DataError(f"Cannot read '{p}' as a .npz file: {exc}") from None
    missing = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")} - set(npz.files)
    if missing:
        raise DataError(f"'{p}' lacks the arrays {', '.join(sorted(missing))} of a MedMNIST-style file.")
    train = npz["train_images"]
    shape = tuple(int(v) for v in train.shape[1:])
    if len(shape) == 2:
        dims, channels = 2, 1
    elif len(shape) == 3 and shape[-1] in (3, 4):
        dims, channels, shape = 2, 3, shape[:2]
    elif len(shape) == 3:
        dims, channels = 3, 1
    else:
        raise DataError(f"'{p}': images of shape {train.shape[1:]} are neither 2D (H, W[, 3]) nor 3D (D, H, W).")
    labels = np.concatenate([np.asarray(npz[f"{s}_labels"]) for s in SPLITS])
    task, n_classes = _task(labels.reshape(len(labels), -1) if labels.ndim > 1 else labels[:, None])
    return DataProfile(dims, channels, shape, task, n_classes, len(npz["train_labels"]), len(npz["val_labels"]),
                       len(npz["test_labels"]))


# Seconds per training image for EfficientNet-Lite0 at 64 px on one 2-core CPU (measured: forward
# and backward, batch 32); the cost grows with the number of pixels.
_SECONDS_PER_IMAGE_64PX = 1 / 110


def recipe_overrides(profile: DataProfile, budget_minutes: float = 12.0) -> list[str]:
    """Config overrides for ``profile`` that fit ``budget_minutes`` of training on a 2-core CPU.

    Images are trained at twice their stored size (at least 64 px, at most 128 px): small
    MedMNIST-style images gain from the backbone's receptive field at a larger scale. The number of
    fine-tuning epochs fills the budget (between 2 and 12), after 2 head-only epochs.
    """
    side = max(profile.image_shape[-2:])
    size = int(min(128, max(64, 2 * side)))
    per_image = _SECONDS_PER_IMAGE_64PX * (size / 64) ** 2 * (profile.image_shape[0] / 8 if profile.dims == 3 else 1)
    epochs = math.floor(budget_minutes * 60 / max(per_image * profile.n_train, 1e-6)) - 1
    epochs = int(min(12, max(2, epochs)))
    return [f"data.size={size}", "train.head_epochs=2", f"train.finetune_epochs={epochs}"]
