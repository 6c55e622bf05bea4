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


# Seconds per training image (forward + backward + augmentation, batch 16) for EfficientNet-Lite0 on
# a 2-core CPU, fitted to epochs measured in benchmarks/medmnist.py: a fixed cost per image, a cost
# per pixel, and a cost per input channel and pixel (the stem convolution and the augmentation of
# volumes whose slices are channels). 16.5 ms for a 64 px grayscale image, 40 ms at 128 px, 18 ms for
# a 28-slice volume at 64 px, 56 ms for a 64-slice volume at 128 px. An evaluation pass costs a
# third of a training step.
_TRAIN_SECONDS_FIXED = 8.7e-3
_TRAIN_SECONDS_PER_PIXEL = 1.9e-6
_TRAIN_SECONDS_PER_CHANNEL_PIXEL = 1.5e-8
_EVAL_FRACTION = 0.3


def train_seconds_per_image(size: int, channels: int) -> float:
    """Estimated seconds of one training step per image of ``size`` px with ``channels`` channels."""
    pixels = size * size
    return _TRAIN_SECONDS_FIXED + _TRAIN_SECONDS_PER_PIXEL * pixels + _TRAIN_SECONDS_PER_CHANNEL_PIXEL * channels * pixels


@dataclass
class Recipe:
    """The CPU-budgeted settings the data profile calls for, and the time they are expected to take."""

    size: int
    finetune_epochs: int
    train_fraction: float
    members: int
    """Ensemble members: leftover budget after the epochs cap is spent on more runs (at most 5)."""
    estimated_minutes: float
    time_limit_minutes: float = 0.0
    """Hard wall-clock limit (``train.time_limit_minutes``) behind the estimate: where the time model
    is optimistic for some data, epochs or members that would not fit are cut, never the 20 minutes."""
    val_max: int = 0
    """Validation images used for model selection (``data.val_max``; 0: all): set on large files,
    where a pass over the whole validation split every epoch would eat the training budget."""

    def overrides(self) -> list[str]:
        out = [f"data.size={self.size}", "train.head_epochs=2", "train.head_augment=false",
               f"train.finetune_epochs={self.finetune_epochs}"]
        if self.time_limit_minutes > 0:
            out.append(f"train.time_limit_minutes={self.time_limit_minutes:g}")
        if self.train_fraction < 1.0:
            out.append(f"data.train_fraction={self.train_fraction:.3f}")
        if self.val_max:
            out.append(f"data.val_max={self.val_max}")
        if self.members > 1:
            out.append(f"train.ensemble={self.members}")
        return out


MAX_EPOCHS = 12
MAX_MEMBERS = 5
TIME_LIMIT_MINUTES = 18.0
"""The recipe's hard limit: 2 minutes under the 20-minute target for reading the file and the report."""
VAL_MAX = 5000
"""Validation images for model selection on large files: the AUC's standard error on 5,000 images is
about 0.005, far below the differences between epochs, and rare classes keep dozens of examples."""


def plan_recipe(profile: DataProfile, budget_minutes: float = 12.0,
                time_limit_minutes: float = TIME_LIMIT_MINUTES) -> Recipe:
    """The recipe for ``profile`` that fits ``budget_minutes`` on a 2-core CPU.

    Images are trained at twice their stored size (at least 64 px, at most 128 px): small
    MedMNIST-style images gain from the backbone's receptive field at a larger scale. After two
    head-only epochs (on cached features), fine-tuning epochs fill the budget (2 to 12, each with a
    validation pass, on at most ``VAL_MAX`` validation images); when even two do not fit, a
    stratified fraction of the training set is used.
    Budget left over once 12 epochs fit trains more ensemble members (small datasets: the val-selected
    single run varies by several AUC points between seeds, the members' mean much less).
    The estimate has run 20-50% short on measured runs (reading and caching the arrays, reports), so
    ``time_limit_minutes`` (``train.time_limit_minutes``) bounds the wall time whatever the data.
    """
    side = max(profile.image_shape[-2:])
    size = int(min(128, max(64, 2 * side)))
    channels = profile.image_shape[0] if profile.dims == 3 else profile.channels
    per_image = train_seconds_per_image(size, channels)
    per_eval = _EVAL_FRACTION * per_image
    n_val = min(profile.n_val, VAL_MAX)
    val_s = per_eval * n_val
    eval_s = per_eval * (n_val + profile.n_test)
    # Fixed per run: the head epochs' feature cache of the validation images, the final val + test pass.
    budget = budget_minutes * 60 - val_s - eval_s
    # Per fine-tuning epoch: a pass over the (possibly subsampled) training set and a validation pass;
    # the training images are also read once by the feature cache of the head epochs.
    epochs = math.floor((budget - per_eval * profile.n_train) / (per_image * profile.n_train + val_s))
    fraction = 1.0
    if epochs < 2:
        epochs = 2
        fraction = (budget - epochs * val_s) / (profile.n_train * (per_eval + epochs * per_image))
        fraction = min(1.0, max(fraction, 0.01))
    epochs = min(MAX_EPOCHS, epochs)
    n = fraction * profile.n_train
    member_s = val_s + eval_s + per_eval * n + epochs * (per_image * n + val_s)
    members = int(min(MAX_MEMBERS, max(1, math.floor((budget_minutes * 60 - eval_s) / member_s))))
    total_s = members * member_s + (eval_s if members > 1 else 0.0)
    return Recipe(size, epochs, fraction, members, total_s / 60, time_limit_minutes,
                  VAL_MAX if profile.n_val > VAL_MAX else 0)


def recipe_overrides(profile: DataProfile, budget_minutes: float = 12.0) -> list[str]:
    """Config overrides for ``profile`` that fit ``budget_minutes`` of training (see :func:`plan_recipe`)."""
    return plan_recipe(profile, budget_minutes).overrides()


def config_for_data(data: str | Path, config_file: str | Path | None = None,
                    overrides: list[str] | None = None):
    """The ``general`` preset with the recipe this data calls for; user settings win."""
    from medtransfer.config import load_config

    profile = profile_npz(data)
    return load_config("general", config_file, recipe_overrides(profile) + list(overrides or [])), profile
