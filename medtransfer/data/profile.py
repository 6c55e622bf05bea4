"""Look at a dataset and decide the recipe from the data itself (no dataset names anywhere).

``profile_npz`` reads a MedMNIST-style ``.npz`` (``{train,val,test}_{images,labels}``) and reports
what it holds: 2D grayscale, 2D colour or 3D volumes; binary, multi-class or multi-label targets;
sizes. ``recipe_overrides`` turns a profile into config overrides that fit a CPU time budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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
    head_epochs: int = 2
    volume: dict[str, Any] = field(default_factory=dict)
    """Volumes: the ``model.*`` settings of the volume encoder (see :func:`plan_volume_recipe` and
    :func:`plan_probe3d_recipe`)."""
    head_solver: str = "sgd"
    """``train.head_solver``: ``logistic`` for the 3D encoder's closed-form head."""
    reasons: list[str] = field(default_factory=list)
    """Why the recipe is what it is, in words (printed by ``medtransfer finetune``)."""

    def overrides(self) -> list[str]:
        out = [f"data.size={self.size}", f"train.head_epochs={self.head_epochs}", "train.head_augment=false",
               f"train.finetune_epochs={self.finetune_epochs}"]
        out += [f"model.{k}={v}" for k, v in self.volume.items()]
        if self.time_limit_minutes > 0:
            out.append(f"train.time_limit_minutes={self.time_limit_minutes:g}")
        if self.train_fraction < 1.0:
            out.append(f"data.train_fraction={self.train_fraction:.3f}")
        if self.val_max:
            out.append(f"data.val_max={self.val_max}")
        if self.members > 1:
            out.append(f"train.ensemble={self.members}")
        if self.head_solver != "sgd":
            out.append(f"train.head_solver={self.head_solver}")
        return out


MAX_EPOCHS = 12
MAX_MEMBERS = 5
TIME_LIMIT_MINUTES = 18.0
"""The recipe's hard limit: 2 minutes under the 20-minute target for reading the file and the report."""
VAL_MAX = 5000
"""Validation images for model selection on large files: the AUC's standard error on 5,000 images is
about 0.005, far below the differences between epochs, and rare classes keep dozens of examples."""


def plan_recipe(profile: DataProfile, budget_minutes: float = 12.0,
                time_limit_minutes: float = TIME_LIMIT_MINUTES, volume_encoder: str = "auto",
                volume_backbone: str | None = None) -> Recipe:
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
    Volumes for ``volume_backbone`` (a pretrained native 3D encoder the user chose; None: the 2D
    backbone) get it as a frozen feature extractor with a logistic head, when its feature pass fits the
    budget (see :func:`plan_probe3d_recipe`).
    """
    if profile.dims == 3 and volume_encoder in ("slices", "views"):
        return plan_volume_recipe(profile, budget_minutes, time_limit_minutes, volume_encoder)
    if profile.dims == 3 and volume_backbone is not None:
        probe = plan_probe3d_recipe(profile, volume_backbone, budget_minutes, time_limit_minutes)
        if probe is not None:
            return probe
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
    reasons = [f"{channels} slices as the input channels of the 2D backbone, fine-tuned (the best of the 2D "
               "encoders on held-out data; --set model.volume_encoder=slices or views sends them slice by slice)"
               ] if profile.dims == 3 else []
    return Recipe(size, epochs, fraction, members, total_s / 60, time_limit_minutes,
                  VAL_MAX if profile.n_val > VAL_MAX else 0, reasons=reasons)


VOLUME_HEAD_EPOCHS = 30
"""Epochs of the pooling + head on a volume's cached slice features (each a fraction of a second)."""
FEATURE_PASS_SHARE = 0.6
"""At most this share of the budget goes to the frozen backbone's pass over the training and validation
volumes; the rest to each member's head epochs and its final validation and test pass."""
_SLICE_SECONDS_PER_PIXEL = 5e-7
"""Frozen EfficientNet-Lite0 without its last stage, per slice image and pixel (inference, batches of
whole volumes, 2-core CPU): fitted to 28³ and 64³ volume runs of ``benchmarks/volume_encoders.py``
(1.9 ms per 64 px slice triplet)."""
_HEAD_SECONDS_PER_SLICE = 2e-5
"""One head epoch (LayerNorm, gated attention, linear) per cached slice feature vector, 2-core CPU."""


def plan_volume_recipe(profile: DataProfile, budget_minutes: float = 12.0,
                       time_limit_minutes: float = TIME_LIMIT_MINUTES, encoder: str = "slices") -> Recipe:
    """Volumes through the 2D backbone slice by slice (``model.volume_encoder=slices``, or ``views``: the
    same along the three directions), frozen; the recipe when the user asks for either encoder.

    Every slice with its two neighbours as RGB goes through the pretrained backbone without its last
    stage (``model.stages=-1``: the mid-level features transfer to small 3D structures better than the
    last, most ImageNet-specific stage); the features are computed once and shared by the ensemble
    members, which train only the attention pooling and the head (``VOLUME_HEAD_EPOCHS``). The in-plane
    size is twice the stored one (64 to 128 px, as for images) and every slice is used where
    the feature pass fits ``FEATURE_PASS_SHARE`` of the budget; otherwise the size comes down to the
    stored one (and 64 px), then every 2nd, 3rd … slice is used. Members fill what is left (at most 5).
    """
    depth, side = profile.image_shape[0], max(profile.image_shape[-2:])
    n_views = 3 if encoder == "views" else 1
    n_val = min(profile.n_val, VAL_MAX)
    sizes = sorted({int(min(128, max(64, 2 * side))), int(min(128, max(32, side))), 64}, reverse=True)
    plans = [(size, stride) for stride in (1, 2, 3, 4, 6, 8, 12, 16) for size in sizes]
    budget = budget_minutes * 60
    for size, stride in plans:
        slices = -(-depth // stride)
        per_volume = n_views * slices * _SLICE_SECONDS_PER_PIXEL * size * size
        cache_s = per_volume * (profile.n_train + n_val)
        # One member: head epochs on the cached features and its final val + test pass.
        eval_s = per_volume * (n_val + profile.n_test)
        single_s = VOLUME_HEAD_EPOCHS * _HEAD_SECONDS_PER_SLICE * slices * profile.n_train + eval_s
        fits = cache_s <= FEATURE_PASS_SHARE * budget and cache_s + single_s <= budget
        if fits or (size, stride) == plans[-1]:
            break
    # Each further member adds its own run and its share of the ensemble's val + test pass through all.
    members = int(min(MAX_MEMBERS, max(1, math.floor((budget - cache_s) / (single_s + eval_s)))))
    member_s = single_s + (eval_s if members > 1 else 0.0)
    reasons = [
        f"{depth} slices of {side}x{side}{' along 3 directions' if n_views == 3 else ''}: each slice with its "
        "neighbours as RGB through the frozen 2D backbone "
        f"(without its last stage), attention pooling over slices",
        f"{size} px, {'every slice' if stride == 1 else f'every {stride}th slice'}: the feature pass over "
        f"{profile.n_train + n_val} training + validation volumes is estimated at {cache_s / 60:.1f} min "
        f"(at most {FEATURE_PASS_SHARE:.0%} of {budget_minutes:g} min)",
        f"{members} member(s) share those features; each trains the pooling and head for {VOLUME_HEAD_EPOCHS} epochs",
    ]
    volume = {"volume_encoder": encoder, "slice_group": 3, "slice_stride": stride, "stages": -1,
              "slice_pooling": "attention"}
    return Recipe(size, 0, 1.0, members, (cache_s + members * member_s) / 60, time_limit_minutes,
                  VAL_MAX if profile.n_val > VAL_MAX else 0, head_epochs=VOLUME_HEAD_EPOCHS, volume=volume,
                  reasons=reasons)


PROBE3D_STAGES = 2
"""``model.stages`` of the probe: a ResNet keeps its stem and ``layer1``, ``layer2`` (truncation counts
the residual stages, not the stem): mid-level features, which transferred best to small volumes
(validation AUC of ``benchmarks/ct_foundation.py``'s stage probe)."""
PROBE3D_MIN_SIDE = 48
"""Volumes smaller than this are resampled up to it: after layer2 (stride 8) a 48³ cube keeps a 6³ map."""
_PROBE3D_SECONDS_PER_VOXEL = 4e-7
"""Frozen I3ResNet-152 to layer2, inference, batches of 16, 2-core CPU: 0.041 s per 48³ and 0.106 s per
64³ volume (``benchmarks/ct_foundation.py``, 2 threads)."""


def plan_probe3d_recipe(profile: DataProfile, backbone: str, budget_minutes: float = 12.0,
                        time_limit_minutes: float = TIME_LIMIT_MINUTES) -> Recipe | None:
    """Single-channel volumes through a pretrained native 3D encoder, frozen after ``PROBE3D_STAGES``
    stages, its pooled features into a logistic regression fitted once (``train.head_solver=logistic``:
    the regularisation chosen on the validation AUC). The volume is resampled to a cube of its largest
    side (at least ``PROBE3D_MIN_SIDE``); where the feature passes over every split (validation twice:
    the cache and the final report) do not fit ``FEATURE_PASS_SHARE`` of the budget, the cube shrinks,
    down to ``PROBE3D_MIN_SIDE``; None when even that does not fit, or for data it does not serve
    (colour or multi-label volumes)."""
    if profile.dims != 3 or profile.channels != 1 or profile.task not in ("binary", "multiclass"):
        return None
    n_val = min(profile.n_val, VAL_MAX)
    volumes = profile.n_train + 2 * n_val + profile.n_test
    side = max(PROBE3D_MIN_SIDE, max(profile.image_shape))
    sizes = [side] + [s for s in (128, 96, 64, PROBE3D_MIN_SIDE) if s < side]
    budget = FEATURE_PASS_SHARE * budget_minutes * 60
    fits = [s for s in sizes if _PROBE3D_SECONDS_PER_VOXEL * s ** 3 * volumes <= budget]
    if not fits:
        return None
    size = fits[0]
    pass_s = _PROBE3D_SECONDS_PER_VOXEL * size ** 3 * volumes
    shape = "x".join(str(d) for d in profile.image_shape)
    reasons = [
        f"{shape} single-channel volumes -> {backbone} (the 3D encoder asked for), frozen, its first "
        f"{PROBE3D_STAGES} residual stages kept, mean-pooled features into a logistic regression chosen on "
        "validation",
        f"{'resampled to' if size != max(profile.image_shape) else 'at'} {size}^3: the feature passes over {volumes} volumes (validation twice) are estimated at "
        f"{pass_s / 60:.1f} min (at most {FEATURE_PASS_SHARE:.0%} of {budget_minutes:g} min)",
    ]
    volume = {"backbone": backbone, "stages": PROBE3D_STAGES}
    return Recipe(size, 0, 1.0, 1, pass_s / 60, time_limit_minutes, VAL_MAX if profile.n_val > VAL_MAX else 0,
                  head_epochs=1, volume=volume, reasons=reasons, head_solver="logistic")


def plan_candidates(profile: DataProfile, budget_minutes: float = 12.0, volume_encoder: str = "auto",
                    volume_backbone: str | None = None, probe_backbone: str | None = None,
                    probe_note: str = "") -> dict[str, Recipe]:
    """The recipes worth fitting for ``profile``, cheapest first, the recipe of :func:`plan_recipe` last;
    more than one when the data alone cannot say which is better, and the run keeps the one with the
    highest validation AUC (:mod:`medtransfer.train.choice`).

    Single-channel volumes, where the user chose neither the encoder nor the backbone, get the 2D
    ``channels`` recipe and, where ``probe_backbone`` (a pretrained native 3D encoder the caller found
    installed) fits the budget, its frozen probe (:func:`plan_probe3d_recipe`): which of the two transfers
    better depends on what the volumes show, not on their size, and the probe costs a fraction of the
    fine-tuning. Anything else: the one recipe of :func:`plan_recipe`; ``probe_note`` (why there is no
    probe backbone) joins its reasons where the data would have taken one.
    """
    primary = plan_recipe(profile, budget_minutes, volume_encoder=volume_encoder, volume_backbone=volume_backbone)
    if profile.dims != 3 or volume_encoder != "auto" or volume_backbone is not None:
        return {"recipe": primary}
    if probe_backbone is None:
        if profile.channels == 1 and probe_note:
            primary.reasons.append(probe_note)
        return {"recipe": primary}
    probe = plan_probe3d_recipe(profile, probe_backbone, budget_minutes)
    if probe is None:
        return {"recipe": primary}
    both = "; fitted on the training split beside the other candidate, the higher validation AUC is kept"
    probe.reasons[0] += both
    primary.reasons[0] += both
    return {"probe3d": probe, "channels": primary}


def recipe_overrides(profile: DataProfile, budget_minutes: float = 12.0, volume_encoder: str = "auto",
                     volume_backbone: str | None = None) -> list[str]:
    """Config overrides for ``profile`` that fit ``budget_minutes`` of training (see :func:`plan_recipe`)."""
    return plan_recipe(profile, budget_minutes, volume_encoder=volume_encoder, volume_backbone=volume_backbone).overrides()


def config_for_data(data: str | Path, config_file: str | Path | None = None,
                    overrides: list[str] | None = None, volume_backbone: str | None = None):
    """The ``general`` preset with the recipe this data calls for; user settings win. ``volume_backbone``:
    the pretrained native 3D encoder the user asked for (see :func:`plan_recipe`; the caller, who can
    read the registry, says whether the asked backbone is one)."""
    cfg, profile, _ = recipe_for_data(data, config_file, overrides, volume_backbone)
    return cfg, profile


def recipe_for_data(data: str | Path, config_file: str | Path | None = None, overrides: list[str] | None = None,
                    volume_backbone: str | None = None) -> tuple[Any, DataProfile, Recipe]:
    """:func:`config_for_data` and the :class:`Recipe` behind it (its estimate and reasons)."""
    cfgs, profile, plans = recipes_for_data(data, config_file, overrides, volume_backbone)
    return cfgs["recipe"], profile, plans["recipe"]  # without a probe backbone: the one recipe


def recipes_for_data(data: str | Path, config_file: str | Path | None = None, overrides: list[str] | None = None,
                     volume_backbone: str | None = None, probe_backbone: str | None = None, probe_note: str = ""
                     ) -> tuple[dict[str, Any], DataProfile, dict[str, Recipe]]:
    """The config of each candidate recipe (:func:`plan_candidates`), the profile and the recipes; user
    settings win over every recipe."""
    from medtransfer.config import load_config

    asked = load_config("general", config_file, overrides)
    profile = profile_npz(data)
    plans = plan_candidates(profile, volume_encoder=asked.model.volume_encoder, volume_backbone=volume_backbone,
                            probe_backbone=probe_backbone, probe_note=probe_note)
    cfgs = {name: load_config("general", config_file, plan.overrides() + list(overrides or []))
            for name, plan in plans.items()}
    return cfgs, profile, plans
