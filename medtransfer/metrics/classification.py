"""Classification metrics: ROC AUC (MedMNIST convention), average precision, operating points, summary dict.

Conventions:

* ``task="binary"``: ``y`` is (N,) or (N, 1) in {0, 1}; ``prob`` is the (N,) positive-class probability or
  (N, 2) class probabilities (the last column is the positive class).
* ``task="multiclass"``: ``y`` is (N,) or (N, 1) class indices; ``prob`` is (N, C). The AUC is macro
  one-vs-rest exactly as MedMNIST's ``getAUC``: the mean over classes ``c`` of
  ``roc_auc_score(y == c, prob[:, c])``.
* ``task="multilabel"``: ``y`` and ``prob`` are (N, C); a label of NaN or -1 means "not annotated" and is
  masked out of that class only.

A metric that is undefined for the data (e.g. an AUC with one class present) is NaN and a
:class:`UndefinedMetricWarning` is issued; a macro average is the mean over the classes where it is defined.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from medtransfer.metrics._utils import (
    UndefinedMetricWarning,
    as_numpy,
    binary_labels,
    nan_to_none,
    positive_scores,
)
from medtransfer.metrics.calibration import (  # noqa: F401  (re-exported: the brief lists them here)
    _check_task,
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from medtransfer.metrics.stats import (  # noqa: F401  (re-exported)
    BootstrapCI,
    CountedAUC,
    DeLongResult,
    PairedBootstrapResult,
    binary_auc,
    bootstrap_ci,
    delong_ci,
    delong_test,
    paired_bootstrap_auc_diff,
    roc_points,
)

logger = logging.getLogger(__name__)

__all__ = [
    # defined here
    "average_precision",
    "binary_metrics_at",
    "choose_threshold",
    "evaluate_classification",
    "multiclass_metrics",
    "roc_auc",
    "THRESHOLD_METHODS",
    # re-exported from calibration and stats so that the classification toolkit is importable from one place
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_curve",
    "BootstrapCI",
    "DeLongResult",
    "PairedBootstrapResult",
    "binary_auc",
    "bootstrap_ci",
    "delong_ci",
    "delong_test",
    "paired_bootstrap_auc_diff",
    "roc_points",
]

THRESHOLD_METHODS = ("youden", "sensitivity", "specificity")


# ------------------------------------------------------------------------------------------- inputs
def _multiclass_inputs(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    p = as_numpy(prob, dtype=np.float64)
    y = as_numpy(y_true)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0]:
        raise ValueError(f"multiclass needs y of shape (N,) and prob of shape (N, C); got {y.shape} and {p.shape}.")
    if not np.isfinite(p).all():
        raise ValueError("prob contains NaN or inf; check the model outputs before computing metrics.")
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(
            f"multiclass labels must be integers in [0, {p.shape[1] - 1}] (prob has {p.shape[1]} columns); "
            f"found values {np.unique(y)[:10].tolist()}."
        )
    return y.astype(np.int64), p


def _multilabel_inputs(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels as float (N, C), prob (N, C) and the mask of annotated entries."""
    y = as_numpy(y_true, dtype=np.float64)
    p = as_numpy(prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != p.shape:
        raise ValueError(f"multilabel needs y and prob of the same shape (N, C); got {y.shape} and {p.shape}.")
    known = np.isfinite(y) & (y >= 0)
    if not np.isin(y[known], [0, 1]).all():
        raise ValueError("multilabel labels must be 0, 1, or NaN/-1 for 'not annotated'.")
    return y, p, known


def _per_class(y_true: Any, prob: Any, task: str, fn: Any) -> np.ndarray:
    """``fn(binary_y, score)`` for each class (one-vs-rest for multiclass, masked for multilabel)."""
    if task == "multiclass":
        y, p = _multiclass_inputs(y_true, prob)
        return np.array([fn((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])], dtype=np.float64)
    y, p, known = _multilabel_inputs(y_true, prob)
    return np.array(
        [fn(y[known[:, c], c].astype(np.int64), p[known[:, c], c]) for c in range(p.shape[1])], dtype=np.float64
    )


def _average(values: np.ndarray, average: str | None, what: str) -> float | np.ndarray:
    undefined = np.flatnonzero(np.isnan(values))
    if undefined.size:
        warnings.warn(
            f"{what} is undefined for class(es) {undefined.tolist()} (only one class present among the annotated "
            "cases); those classes are NaN and left out of the macro average.",
            UndefinedMetricWarning,
            stacklevel=3,
        )
    if average is None:
        return values
    if average != "macro":
        raise ValueError(f"average must be 'macro' or None, got {average!r}.")
    if undefined.size == values.size:
        return float("nan")
    return float(np.nanmean(values))


# ------------------------------------------------------------------------------------------- ranking
def roc_auc(y_true: Any, prob: Any, task: str = "binary", average: str | None = "macro") -> float | np.ndarray:
    """Area under the ROC curve; NaN (with a warning) where only one class is present.

    Binary returns a float. Multiclass (macro one-vs-rest, MedMNIST's convention) and multilabel (masked per
    class) return the macro mean, or the per-class (C,) array with ``average=None``.
    """
    _check_task(task)
    if task == "binary":
        value = binary_auc(binary_labels(y_true), positive_scores(prob))
        if math.isnan(value):
            warnings.warn("ROC AUC is undefined: only one class is present in y_true; returning NaN.",
                          UndefinedMetricWarning, stacklevel=2)
        return value
    return _average(_per_class(y_true, prob, task, binary_auc), average, "ROC AUC")


def _binary_ap(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    if y.sum() == 0:
        return float("nan")
    return float(average_precision_score(y, s))


def average_precision(
    y_true: Any, prob: Any, task: str = "binary", average: str | None = "macro"
) -> float | np.ndarray:
    """Average precision (area under the precision-recall curve, scikit-learn's step definition).

    Undefined (NaN, with a warning) when a class has no positive case. Same shapes and averaging as
    :func:`roc_auc`.
    """
    _check_task(task)
    if task == "binary":
        value = _binary_ap(binary_labels(y_true), positive_scores(prob))
        if math.isnan(value):
            warnings.warn("Average precision is undefined: y_true has no positive case; returning NaN.",
                          UndefinedMetricWarning, stacklevel=2)
        return value
    return _average(_per_class(y_true, prob, task, _binary_ap), average, "Average precision")


# ------------------------------------------------------------------------------------ operating point
def choose_threshold(y_val: Any, p_val: Any, method: str = "youden", target: float | None = None) -> float:
    """Operating threshold for a binary score, chosen on validation data; a case is positive if ``p >= t``.

    Methods:
        ``"youden"``: maximises sensitivity + specificity - 1 (ties: the highest threshold).
        ``"sensitivity"``: the highest threshold whose sensitivity is >= ``target`` (best specificity).
        ``"specificity"``: the lowest threshold whose specificity is >= ``target`` (best sensitivity).

    The threshold is always one of the observed scores, or just above the highest score when no case should
    be called positive. Returns NaN (with a warning) when ``y_val`` holds only one class.
    """
    if method not in THRESHOLD_METHODS:
        from medtransfer._suggest import did_you_mean

        raise ValueError(f"Unknown threshold method {method!r}.{did_you_mean(str(method), THRESHOLD_METHODS)} "
                         f"Valid methods: {', '.join(THRESHOLD_METHODS)}.")
    if method == "youden":
        if target is not None:
            raise ValueError("target is only used with method='sensitivity' or 'specificity', not 'youden'.")
    elif target is None or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"method={method!r} needs target in (0, 1], e.g. target=0.9; got {target!r}.")
    y, s = binary_labels(y_val, "y_val"), positive_scores(p_val, "p_val")
    if y.sum() == 0 or y.sum() == y.size:
        warnings.warn("Cannot choose an operating threshold: only one class is present in y_val; returning NaN.",
                      UndefinedMetricWarning, stacklevel=2)
        return float("nan")
    fpr, tpr, thr = roc_points(y, s)  # thresholds decreasing, thr[0] = +inf
    if method == "youden":
        i = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        i = int(np.flatnonzero(tpr >= float(target) - 1e-12)[0])
    else:
        i = int(np.flatnonzero(1.0 - fpr >= float(target) - 1e-12)[-1])
    t = float(thr[i])
    if not math.isfinite(t):
        t = float(np.nextafter(s.max(), np.inf))
    return t


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def binary_metrics_at(y: Any, p: Any, threshold: float) -> dict[str, Any]:
    """Confusion counts and rates of a binary score at ``threshold`` (positive if ``p >= threshold``).

    Returns ``threshold, n, n_positive, n_negative, tp, fp, tn, fn, sensitivity, specificity, ppv, npv, f1,
    balanced_accuracy, accuracy`` and ``confusion_matrix`` = ``[[tn, fp], [fn, tp]]`` (rows: true class,
    columns: predicted class, as scikit-learn). A rate whose denominator is zero is NaN.
    """
    y_arr, s = binary_labels(y), positive_scores(p, "p")
    if y_arr.shape != s.shape:
        raise ValueError(f"y and p must have the same length; got {y_arr.shape[0]} and {s.shape[0]}.")
    pred = s >= float(threshold)
    tp = int(np.sum(pred & (y_arr == 1)))
    fp = int(np.sum(pred & (y_arr == 0)))
    fn = int(np.sum(~pred & (y_arr == 1)))
    tn = int(np.sum(~pred & (y_arr == 0)))
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "n": int(y_arr.size),
        "n_positive": tp + fn,
        "n_negative": tn + fp,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2.0,
        "accuracy": _ratio(tp + tn, y_arr.size),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def multiclass_metrics(y: Any, prob: Any) -> dict[str, Any]:
    """Argmax accuracy, balanced accuracy (mean recall over classes present in ``y``) and confusion matrix.

    ``confusion_matrix[i][j]`` counts cases of true class ``i`` predicted as ``j``.
    """
    y_arr, p = _multiclass_inputs(y, prob)
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_arr, pred), 1)
    support = cm.sum(axis=1)
    recall = np.diag(cm)[support > 0] / support[support > 0]
    return {
        "n": int(y_arr.size),
        "accuracy": _ratio(np.trace(cm), y_arr.size),
        "balanced_accuracy": float(recall.mean()) if recall.size else float("nan"),
        "confusion_matrix": cm.tolist(),
    }


def ordinal_grade(prob: Any) -> np.ndarray:
    """The predicted grade of ordered classes: the median of each predictive distribution, i.e. the number
    of cumulative probabilities ``P(y > k)`` above 0.5 (the CORAL rule; it minimises the expected error
    in grades, where argmax need not)."""
    p = as_numpy(prob, dtype=np.float64)
    above = 1.0 - np.cumsum(p, axis=1)[:, :-1]
    return (above > 0.5).sum(axis=1)


def quadratic_weighted_kappa(y: Any, prob: Any) -> float:
    """Cohen's kappa with quadratic weights between true and predicted grades (1: perfect, 0: chance)."""
    y_arr, p = _multiclass_inputs(y, prob)
    k = p.shape[1]
    pred = ordinal_grade(p)
    observed = np.zeros((k, k))
    np.add.at(observed, (y_arr, pred), 1.0)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1.0)
    w = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / max((k - 1) ** 2, 1)
    den = float((w * expected).sum())
    return float("nan") if den == 0 else 1.0 - float((w * observed).sum()) / den


def grade_mae(y: Any, prob: Any) -> float:
    """Mean absolute error in grades between the true and the predicted (median) grade."""
    y_arr, p = _multiclass_inputs(y, prob)
    return float(np.abs(ordinal_grade(p) - y_arr).mean())


def ordinal_metrics(y: Any, prob: Any, patient_ids: Sequence[Any] | None = None, n_boot: int = 1000,
                    alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Metrics of ordered classes (grades): quadratic weighted kappa and grade MAE of the median grade,
    each with a percentile-bootstrap CI over patients."""
    ids = list(patient_ids) if patient_ids is not None else None
    out = {}
    for key, fn in (("quadratic_weighted_kappa", quadratic_weighted_kappa), ("grade_mae", grade_mae)):
        ci = bootstrap_ci(fn, y, prob, groups=ids, n_boot=n_boot, alpha=alpha, seed=seed) if n_boot else None
        out[key] = _ci_block(ci, fn(y, prob))
    return out


# --------------------------------------------------------------------------------------------- summary
def _strict_macro_auc(task: str, classes: np.ndarray):  # type: ignore[no-untyped-def]
    """Macro AUC over ``classes`` that is NaN as soon as one of them is undefined (for bootstrap resamples)."""

    def fn(y: np.ndarray, p: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            per = _per_class(y, p, task, binary_auc)[classes]
        return float(per.mean()) if not np.isnan(per).any() else float("nan")

    return fn


def _counted_macro_auc(y: np.ndarray, p: np.ndarray, task: str, classes: np.ndarray):  # type: ignore[no-untyped-def]
    """:func:`_strict_macro_auc` of a resample given as draw counts (one :class:`CountedAUC` per class)."""
    if task == "multiclass":
        per = [CountedAUC((y == c).astype(np.int64), p[:, c]) for c in classes]
    else:
        known = np.isfinite(y) & (y >= 0)
        per = [CountedAUC(y[known[:, c], c].astype(np.int64), p[known[:, c], c], np.flatnonzero(known[:, c]))
               for c in classes]

    def fn(counts: np.ndarray) -> float:
        values = [auc(counts) for auc in per]
        return float("nan") if any(math.isnan(v) for v in values) else float(np.mean(values))

    return fn


def _n_groups(patient_ids: Sequence[Any] | None) -> int | None:
    if patient_ids is None:
        return None
    return len({str(g) for g in patient_ids if g is not None and g == g and g != ""})


def _ci_block(ci: BootstrapCI | None, value: float) -> dict[str, Any]:
    if ci is None:
        return {"value": value, "ci_low": None, "ci_high": None, "n_boot": 0}
    return {
        "value": value,
        "ci_low": ci.low,
        "ci_high": ci.high,
        "alpha": ci.alpha,
        "n_boot": ci.n_boot,
        "n_skipped": ci.n_skipped,
        "resampled": "patients" if ci.resampled == "groups" else "images",
        "method": "percentile bootstrap",
    }


def evaluate_classification(
    y_true: Any,
    prob: Any,
    *,
    task: str,
    label_names: Sequence[str],
    patient_ids: Sequence[Any] | None = None,
    threshold: float | Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict[str, Any]:
    """All headline classification metrics of one split as a JSON-serialisable dict.

    Keys: ``task, label_names, n`` (images), ``n_patients`` (None without ``patient_ids``),
    ``auc`` = ``{value, ci_low, ci_high, ...}`` (percentile bootstrap over patients when ``patient_ids`` are
    given, else over images; ``n_boot=0`` skips it), ``average_precision``, ``ece`` (``n_bins`` equal-width
    bins, see :mod:`medtransfer.metrics.calibration`), and by task:

    * binary: ``n_positive, n_negative, operating_point`` (:func:`binary_metrics_at` at ``threshold`` plus
      bootstrap ``sensitivity_ci``/``specificity_ci``; None when ``threshold`` is None);
    * multiclass: ``accuracy, balanced_accuracy, confusion_matrix, per_class``;
    * multilabel: ``per_class`` and, when ``threshold`` is given (one float or one per class),
      ``operating_point`` per class name.

    ``per_class`` maps each label name to ``{auc, average_precision, n_positive}``.
    Values that are undefined (NaN) are returned as ``None``.
    """
    _check_task(task)
    names = [str(n) for n in label_names]
    ids = None if patient_ids is None else list(patient_ids)
    out: dict[str, Any] = {"task": task, "label_names": names}

    if task == "binary":
        y, s = binary_labels(y_true), positive_scores(prob)
        if len(names) != 2:
            raise ValueError(f"A binary task needs 2 label names (negative, positive); got {names}.")
        n_classes, metric_fn, counted = 2, binary_auc, None  # bootstrap_ci counts binary_auc itself
        auc_value = roc_auc(y, s, task)
        ap_value = average_precision(y, s, task)
        p_for_boot: np.ndarray = s
    else:
        if task == "multiclass":
            y, p = _multiclass_inputs(y_true, prob)
        else:
            y, p, _ = _multilabel_inputs(y_true, prob)
        n_classes = p.shape[1]
        if len(names) != n_classes:
            raise ValueError(f"prob has {n_classes} columns but {len(names)} label names were given: {names}.")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UndefinedMetricWarning)
            per_auc = roc_auc(y, p, task, average=None)
            per_ap = average_precision(y, p, task, average=None)
        for w in caught[:1]:
            warnings.warn(str(w.message), w.category, stacklevel=2)
        defined = np.flatnonzero(~np.isnan(per_auc))
        auc_value = float(per_auc[defined].mean()) if defined.size else float("nan")
        ap_value = float(np.nanmean(per_ap)) if (~np.isnan(per_ap)).any() else float("nan")
        metric_fn, p_for_boot = _strict_macro_auc(task, defined), p
        counted = _counted_macro_auc(y, p, task, defined)
        if task == "multiclass":
            n_pos = np.bincount(y, minlength=n_classes)
        else:
            known = np.isfinite(y) & (y >= 0)
            n_pos = np.where(known, y, 0).sum(axis=0).astype(np.int64)
        out["per_class"] = {
            name: {"auc": per_auc[c], "average_precision": per_ap[c], "n_positive": int(n_pos[c])}
            for c, name in enumerate(names)
        }

    out["n"] = int(y.shape[0])
    out["n_patients"] = _n_groups(ids)
    ci = None
    if n_boot and not math.isnan(auc_value):
        ci = bootstrap_ci(metric_fn, y, p_for_boot, groups=ids, n_boot=n_boot, alpha=alpha, seed=seed,
                          counted=counted)
    out["auc"] = _ci_block(ci, auc_value)
    out["average_precision"] = ap_value
    out["ece"] = expected_calibration_error(y, prob if task != "binary" else s, task=task, n_bins=n_bins)
    out["ece_n_bins"] = int(n_bins)

    if task == "binary":
        out["n_positive"], out["n_negative"] = int(y.sum()), int(y.size - y.sum())
        out["operating_point"] = None
        if threshold is not None and not math.isnan(float(threshold)):  # type: ignore[arg-type]
            t = float(threshold)  # type: ignore[arg-type]
            op = binary_metrics_at(y, s, t)
            if n_boot:
                for key in ("sensitivity", "specificity"):
                    op[f"{key}_ci"] = _rate_ci(key, y, s, t, ids, n_boot, alpha, seed)
            out["operating_point"] = op
    elif task == "multiclass":
        out.update({k: v for k, v in multiclass_metrics(y, p).items() if k != "n"})
    elif threshold is not None:
        thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (n_classes,))
        known = np.isfinite(y) & (y >= 0)
        out["operating_point"] = {
            name: binary_metrics_at(y[known[:, c], c].astype(np.int64), p[known[:, c], c], float(thresholds[c]))
            for c, name in enumerate(names)
        }
    return nan_to_none(out)


def _rate_ci(key: str, y: np.ndarray, s: np.ndarray, t: float, ids: list[Any] | None,
             n_boot: int, alpha: float, seed: int) -> list[float]:
    def fn(yy: np.ndarray, ss: np.ndarray) -> float:
        return binary_metrics_at(yy, ss, t)[key]

    # The same rate from draw counts: the fraction of drawn positives (negatives) called positive (negative).
    cls = 1 if key == "sensitivity" else 0
    members, hit = np.asarray(y) == cls, (np.asarray(s) >= t) == bool(cls)

    def counted(counts: np.ndarray) -> float:
        total = counts[members].sum()
        return float(counts[members & hit].sum() / total) if total else float("nan")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ci = bootstrap_ci(fn, y, s, groups=ids, n_boot=n_boot, alpha=alpha, seed=seed, counted=counted)
    return [ci.low, ci.high]
