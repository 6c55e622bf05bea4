"""Segmentation metrics on integer label maps (2D or 3D) with physical voxel spacing.

Per case and per foreground label:

* ``dice`` = 2|P∩T| / (|P| + |T|).
* ``hd95_mm``: 95th-percentile symmetric Hausdorff distance between the boundaries, in millimetres
  (MONAI ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th percentiles).
* ``nsd``: normalised surface Dice at a tolerance in millimetres (MONAI ``compute_surface_dice``).

Empty-mask rule (one rule for every metric): a label absent from both prediction and reference is **NaN**
for all three metrics and left out of means (the summary counts it in ``n_both_empty``). A label present in
only one of them scores ``dice = 0``, ``nsd = 0`` and ``hd95_mm = NaN`` (no finite distance exists; counted
in ``n_hd95_undefined``).

``spacing`` is the voxel size in mm along each array axis, in array axis order (a scalar means isotropic).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from medtransfer.metrics._utils import as_numpy, nan_to_none

logger = logging.getLogger(__name__)

__all__ = [
    "SegmentationEvaluator",
    "dice_per_label",
    "evaluate_segmentation",
    "hd95_per_label",
    "nsd_per_label",
    "segmentation_metrics",
]

METRICS = ("dice", "hd95_mm", "nsd")


def _label_map(x: Any, name: str) -> np.ndarray:
    arr = as_numpy(x)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must be a 2D or 3D integer label map, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise ValueError(f"{name} must hold integer labels; found non-integer values (is it a probability map? "
                             "take argmax or threshold it first).")
        arr = rounded
    return arr.astype(np.int64)


def _spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim or not (sp > 0).all():
        raise ValueError(f"spacing must be one positive value per array axis ({ndim}), got {spacing!r}.")
    return tuple(float(v) for v in sp)


def _labels(label_names: Sequence[str] | Mapping[int, str]) -> dict[int, str]:
    """Label value -> name. A sequence is indexed by label value and its entry 0 (background) is skipped."""
    if isinstance(label_names, Mapping):
        return {int(k): str(v) for k, v in label_names.items()}
    return {i: str(n) for i, n in enumerate(label_names) if i != 0}


def _pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _label_map(pred, "pred"), _label_map(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred and true must have the same shape; got {p.shape} and {t.shape}. "
                         "Resample the prediction onto the reference grid first.")
    return p, t


def dice_per_label(pred: Any, true: Any, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label value (NaN when the label is absent from both maps, see module docstring)."""
    p, t = _pair(pred, true)
    out: dict[int, float] = {}
    for lab in labels:
        pm, tm = p == lab, t == lab
        denom = int(pm.sum()) + int(tm.sum())
        out[int(lab)] = float("nan") if denom == 0 else 2.0 * int(np.sum(pm & tm)) / denom
    return out


@contextlib.contextmanager
def _quiet_monai_internals() -> Iterator[None]:
    # MONAI 1.5+ calls its own deprecated argument inside the surface-distance helpers; not actionable here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*", category=FutureWarning)
        yield


def _one_hot(mask: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(mask[None, None].astype(np.float32))


def hd95_per_label(pred: Any, true: Any, labels: Sequence[int], spacing: Any = None,
                   percentile: float = 95.0) -> dict[int, float]:
    """Percentile Hausdorff distance in mm per label value (NaN unless the label is in both maps)."""
    from monai.metrics import compute_hausdorff_distance

    p, t = _pair(pred, true)
    sp = _spacing(spacing, p.ndim)
    out: dict[int, float] = {}
    for lab in labels:
        pm, tm = p == lab, t == lab
        if not pm.any() or not tm.any():
            out[int(lab)] = float("nan")
            continue
        with _quiet_monai_internals():
            hd = compute_hausdorff_distance(_one_hot(pm), _one_hot(tm), include_background=True,
                                            percentile=percentile, spacing=list(sp))
        out[int(lab)] = float(hd[0, 0])
    return out


def nsd_per_label(pred: Any, true: Any, labels: Sequence[int], spacing: Any = None,
                  tolerance_mm: float | Sequence[float] = 1.0) -> dict[int, float]:
    """Normalised surface Dice per label value at ``tolerance_mm`` (one value, or one per label)."""
    from monai.metrics import compute_surface_dice

    p, t = _pair(pred, true)
    sp = _spacing(spacing, p.ndim)
    tol = np.broadcast_to(np.asarray(tolerance_mm, dtype=np.float64), (len(labels),))
    out: dict[int, float] = {}
    for lab, tol_c in zip(labels, tol):
        pm, tm = p == lab, t == lab
        if not pm.any() and not tm.any():
            out[int(lab)] = float("nan")
        elif not pm.any() or not tm.any():
            out[int(lab)] = 0.0
        else:
            with _quiet_monai_internals():
                nsd = compute_surface_dice(_one_hot(pm), _one_hot(tm), class_thresholds=[float(tol_c)],
                                           include_background=True, spacing=list(sp))
            out[int(lab)] = float(nsd[0, 0])
    return out


def segmentation_metrics(pred: Any, true: Any, spacing: Any, label_names: Sequence[str] | Mapping[int, str], *,
                         nsd_tolerance_mm: float | Sequence[float] = 1.0) -> dict[str, dict[str, float]]:
    """``{label_name: {dice, hd95_mm, nsd, volume_true_mm3, volume_pred_mm3}}`` for one case."""
    labels = _labels(label_names)
    p, t = _pair(pred, true)
    sp = _spacing(spacing, p.ndim)
    voxel = float(np.prod(sp))
    values = list(labels)
    dice = dice_per_label(p, t, values)
    hd = hd95_per_label(p, t, values, sp)
    nsd = nsd_per_label(p, t, values, sp, nsd_tolerance_mm)
    return {
        name: {
            "dice": dice[lab],
            "hd95_mm": hd[lab],
            "nsd": nsd[lab],
            "volume_true_mm3": float(np.sum(t == lab)) * voxel,
            "volume_pred_mm3": float(np.sum(p == lab)) * voxel,
        }
        for lab, name in labels.items()
    }


def _summary_stats(values: np.ndarray, n_boot: int, alpha: float, seed: int) -> dict[str, Any]:
    finite = values[~np.isnan(values)]
    out: dict[str, Any] = {"n": int(finite.size), "n_nan": int(values.size - finite.size)}
    if finite.size == 0:
        return out | {"mean": None, "std": None, "median": None, "ci_low": None, "ci_high": None}
    out |= {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        "median": float(np.median(finite)),
    }
    if n_boot and finite.size > 1:
        rng = np.random.default_rng(seed)
        means = finite[rng.integers(0, finite.size, (n_boot, finite.size))].mean(axis=1)
        lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
        out |= {"ci_low": float(lo), "ci_high": float(hi)}
    else:
        out |= {"ci_low": None, "ci_high": None}
    return out


class SegmentationEvaluator:
    """Accumulates per-case segmentation metrics: ``update`` per case, ``aggregate`` for rows + summary.

    Args:
        label_names: names indexed by label value (entry 0 = background, skipped) or ``{value: name}``.
        nsd_tolerance_mm: NSD tolerance, one value or one per foreground label.
        n_boot: bootstrap resamples (over cases) for the CI of each mean; 0 disables it.
    """

    def __init__(self, label_names: Sequence[str] | Mapping[int, str], *,
                 nsd_tolerance_mm: float | Sequence[float] = 1.0, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> None:
        self.label_names = label_names
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.n_boot = n_boot
        self.alpha = alpha
        self.seed = seed
        self.labels_ = _labels(label_names)
        if not self.labels_:
            raise ValueError("label_names gives no foreground label; e.g. ['background', 'liver'].")
        self.rows_: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Forget all cases."""
        self.rows_ = []

    def update(self, case_id: str, pred: Any, true: Any, spacing: Any = None) -> dict[str, Any]:
        """Score one case and return its row (``case_id`` then ``<metric>_<label_name>`` columns)."""
        per = segmentation_metrics(pred, true, spacing, self.labels_, nsd_tolerance_mm=self.nsd_tolerance_mm)
        row: dict[str, Any] = {"case_id": str(case_id)}
        for name, vals in per.items():
            for key, value in vals.items():
                row[f"{key}_{name}"] = value
        self.rows_.append(row)
        return row

    @property
    def columns(self) -> list[str]:
        """Column order of the per-case rows."""
        keys = ("dice", "hd95_mm", "nsd", "volume_true_mm3", "volume_pred_mm3")
        return ["case_id"] + [f"{k}_{n}" for n in self.labels_.values() for k in keys]

    def aggregate(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-case rows and the summary dict (NaN as None).

        Summary: ``n_cases``, ``nsd_tolerance_mm`` and ``per_label[name][metric]`` = ``{mean, std, median,
        ci_low, ci_high, n, n_nan}`` (bootstrap over cases), plus ``n_both_empty`` and ``n_hd95_undefined`` per
        label, and ``mean_dice`` / ``mean_hd95_mm`` / ``mean_nsd``: the mean over labels of the per-label means.
        """
        per_label: dict[str, Any] = {}
        for name in self.labels_.values():
            block: dict[str, Any] = {}
            for metric in METRICS:
                vals = np.array([r[f"{metric}_{name}"] for r in self.rows_], dtype=np.float64)
                block[metric] = _summary_stats(vals, self.n_boot, self.alpha, self.seed)
            vt = np.array([r[f"volume_true_mm3_{name}"] for r in self.rows_], dtype=np.float64)
            vp = np.array([r[f"volume_pred_mm3_{name}"] for r in self.rows_], dtype=np.float64)
            block["n_both_empty"] = int(np.sum((vt == 0) & (vp == 0)))
            block["n_hd95_undefined"] = int(np.sum((vt == 0) ^ (vp == 0)))
            per_label[name] = block
        summary: dict[str, Any] = {
            "n_cases": len(self.rows_),
            "nsd_tolerance_mm": np.asarray(self.nsd_tolerance_mm, dtype=np.float64).tolist(),
            "empty_mask_rule": "label absent from both maps: NaN (excluded); present in one only: dice=0, nsd=0, "
                               "hd95=NaN",
            "per_label": per_label,
        }
        for metric in METRICS:
            means = [b[metric]["mean"] for b in per_label.values() if b[metric]["mean"] is not None]
            summary[f"mean_{metric}"] = float(np.mean(means)) if means else None
        return [dict(r) for r in self.rows_], nan_to_none(summary)


def evaluate_segmentation(
    cases: Sequence[tuple[str, Any, Any, Any]],
    label_names: Sequence[str] | Mapping[int, str],
    *,
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``(case_id, pred_labelmap, true_labelmap, spacing)`` cases; returns ``(per_case_rows, summary)``.

    See :class:`SegmentationEvaluator` for the row and summary layout and the module docstring for the
    empty-mask rule. Rows keep NaN (write them with an empty cell); the summary has None instead.
    """
    ev = SegmentationEvaluator(label_names, nsd_tolerance_mm=nsd_tolerance_mm, n_boot=n_boot, seed=seed)
    for case_id, pred, true, spacing in cases:
        ev.update(case_id, pred, true, spacing)
    return ev.aggregate()
