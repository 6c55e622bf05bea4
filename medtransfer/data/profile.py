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


# Seconds per image for EfficientNet-Lite0 at 64 px on a 2-core CPU, batch 16: a training step
# (forward + backward) and an evaluation forward pass. The cost grows with the number of pixels.
_TRAIN_SECONDS_64PX = 1 / 80
_EVAL_SECONDS_64PX = 1 / 300


def recipe_overrides(profile: DataProfile, budget_minutes: float = 12.0) -> list[str]:
    """Config overrides for ``profile`` that fit ``budget_minutes`` of training on a 2-core CPU.

    Images are trained at twice their stored size (at least 64 px, at most 128 px): small
    MedMNIST-style images gain from the backbone's receptive field at a larger scale. After two
    head-only epochs (on cached features), fine-tuning epochs fill the budget (2 to 12, each with a
    validation pass); when even two do not fit, a stratified fraction of the training set is used.
    """
    side = max(profile.image_shape[-2:])
    size = int(min(128, max(64, 2 * side)))
    scale = (size / 64) ** 2
    train_s = _TRAIN_SECONDS_64PX * scale * profile.n_train
    val_s = _EVAL_SECONDS_64PX * scale * profile.n_val
    head_s = 2 * (val_s + _EVAL_SECONDS_64PX * scale * profile.n_train / 2)  # cached features
    budget = budget_minutes * 60 - head_s - _EVAL_SECONDS_64PX * scale * (profile.n_val + profile.n_test)
    epochs = int(min(12, max(2, math.floor(budget / max(train_s + val_s, 1e-6)))))
    fraction = min(1.0, budget / (epochs * (train_s + val_s))) if budget > 0 else 0.05
    out = [f"data.size={size}", "train.head_epochs=2", "train.head_augment=false", f"train.finetune_epochs={epochs}"]
    if fraction < 1.0:
        out.append(f"data.train_fraction={max(fraction, 0.01):.3f}")
    return out


def config_for_data(data: str | Path, config_file: str | Path | None = None,
                    overrides: list[str] | None = None):
    """The ``general`` preset with the recipe this data calls for; user settings win."""
    from medtransfer.config import load_config

    profile = profile_npz(data)
    return load_config("general", config_file, recipe_overrides(profile) + list(overrides or [])), profile
