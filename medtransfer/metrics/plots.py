"""Evaluation figures as PNG files: ROC (with bootstrap band), precision-recall, reliability diagram,
confusion matrix, learning curves and segmentation overlays.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, so pyplot's global
state and the user's backend are never touched and nothing is shown. Every function writes its PNG
atomically (temporary file, then ``os.replace``) and returns the path written.
"""
from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.metrics._utils import as_numpy, binary_labels, positive_scores
from medtransfer.utils.atomic import atomic_path
from medtransfer.metrics.calibration import _check_task, reliability_curve
from medtransfer.metrics.stats import _group_codes, _resample_counts, binary_auc, roc_points

logger = logging.getLogger(__name__)

__all__ = [
    "HISTORY_COLUMNS",
    "history_phases",
    "learning_curves_figure",
    "load_history",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_precision_recall",
    "plot_reliability",
    "plot_roc",
    "plot_segmentation_overlay",
    "roc_curve_band",
]

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "lr")
_DPI = 120


def _figure(width: float = 5.0, height: float = 4.5, *, constrained: bool = False) -> Any:
    """A new figure; simple plots get fixed margins (a layout engine would cost an extra draw per save)."""
    from matplotlib.figure import Figure

    if constrained:
        return Figure(figsize=(width, height), layout="constrained")
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93, hspace=0.25)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Render ``fig`` to PNG at ``path`` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    logger.debug("wrote %s", path)
    return path


# ------------------------------------------------------------------------------------------------ ROC / PR
def roc_curve_band(
    y_true: Any,
    prob: Any,
    *,
    groups: Sequence[Any] | None = None,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    n_grid: int = 101,
) -> dict[str, Any]:
    """Binary ROC curve and a pointwise percentile-bootstrap band of TPR on a fixed FPR grid.

    Resamples patients when ``groups`` are given. Returns ``fpr, tpr, thresholds`` (the empirical curve),
    ``auc``, ``grid``, ``tpr_low``, ``tpr_high``, ``n_boot`` and ``n_skipped`` (single-class resamples).
    """
    y, s = binary_labels(y_true), positive_scores(prob)
    fpr, tpr, thr = roc_points(y, s)
    grid = np.linspace(0.0, 1.0, n_grid)
    codes = None if groups is None else _group_codes(groups, y.size)
    rng = np.random.default_rng(seed)
    base = np.arange(y.size)
    curves, skipped = [], 0
    for _ in range(n_boot):
        idx = np.repeat(base, _resample_counts(rng, y.size, codes))
        yb, sb = y[idx], s[idx]
        if yb.min() == yb.max():
            skipped += 1
            continue
        f, t, _ = roc_points(yb, sb)
        curves.append(np.interp(grid, f, t))
    if curves:
        low, high = np.quantile(np.vstack(curves), [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    else:
        low = high = np.full_like(grid, np.nan)
    return {
        "fpr": fpr, "tpr": tpr, "thresholds": thr, "auc": binary_auc(y, s), "grid": grid,
        "tpr_low": low, "tpr_high": high, "n_boot": int(n_boot), "n_skipped": int(skipped),
    }


def _one_vs_rest(y_true: Any, prob: Any, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(binary y, score) per class for multiclass (one-vs-rest) and multilabel (annotated entries only)."""
    p = as_numpy(prob, dtype=np.float64)
    if task == "multiclass":
        y = as_numpy(y_true).reshape(-1).astype(np.int64)
        return [((y == c).astype(np.int64), p[:, c]) for c in range(p.shape[1])]
    y = as_numpy(y_true, dtype=np.float64)
    known = np.isfinite(y) & (y >= 0)
    return [(y[known[:, c], c].astype(np.int64), p[known[:, c], c]) for c in range(p.shape[1])]


def plot_roc(
    path: str | os.PathLike,
    y_true: Any,
    prob: Any,
    *,
    task: str = "binary",
    label_names: Sequence[str] | None = None,
    groups: Sequence[Any] | None = None,
    n_boot: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    operating_point: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """ROC curve; binary gets a bootstrap band (:func:`roc_curve_band`) and an optional operating point
    (a dict with ``sensitivity`` and ``specificity``); multiclass/multilabel get one curve per class."""
    _check_task(task)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    if task == "binary":
        band = roc_curve_band(y_true, prob, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed)
        if n_boot:
            ax.fill_between(band["grid"], band["tpr_low"], band["tpr_high"], color="C0", alpha=0.2,
                            label=f"{100 * (1 - alpha):.0f}% bootstrap band")
        ax.plot(band["fpr"], band["tpr"], color="C0", lw=2, label=f"AUC = {band['auc']:.3f}")
        if operating_point and operating_point.get("sensitivity") is not None:
            ax.plot(1 - operating_point["specificity"], operating_point["sensitivity"], "o", color="C3",
                    label=f"threshold {operating_point.get('threshold', float('nan')):.3g}")
    else:
        names = list(label_names) if label_names else None
        for c, (yc, sc) in enumerate(_one_vs_rest(y_true, prob, task)):
            if yc.size == 0 or yc.min() == yc.max():
                continue
            f, t, _ = roc_points(yc, sc)
            name = names[c] if names else str(c)
            ax.plot(f, t, lw=1.5, label=f"{name} ({binary_auc(yc, sc):.3f})")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01),
           title=title or "ROC curve")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_precision_recall(
    path: str | os.PathLike,
    y_true: Any,
    prob: Any,
    *,
    task: str = "binary",
    label_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Precision-recall curve(s) with average precision in the legend and the prevalence as baseline."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    _check_task(task)
    pairs = ([(binary_labels(y_true), positive_scores(prob))] if task == "binary"
             else _one_vs_rest(y_true, prob, task))
    names = (["positive"] if task == "binary" else list(label_names or [str(c) for c in range(len(pairs))]))
    fig = _figure()
    ax = fig.add_subplot()
    for c, (yc, sc) in enumerate(pairs):
        if yc.size == 0 or yc.sum() == 0:
            continue
        prec, rec, _ = precision_recall_curve(yc, sc)
        ap = average_precision_score(yc, sc)
        ax.step(rec, prec, where="post", lw=1.5, color=f"C{c % 10}", label=f"{names[c]}: AP = {ap:.3f}")
        if task == "binary":
            ax.axhline(yc.mean(), color="0.7", ls="--", lw=1, label=f"prevalence {yc.mean():.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01),
           title=title or "Precision-recall curve")
    ax.legend(loc="lower left", fontsize="small")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- calibration
def plot_reliability(
    path: str | os.PathLike,
    y_true: Any,
    prob: Any,
    *,
    task: str = "binary",
    n_bins: int = 10,
    title: str | None = None,
) -> Path:
    """Reliability diagram (observed frequency per confidence bin, see :func:`reliability_curve`) with the
    bin counts underneath and the ECE in the title."""
    rc = reliability_curve(y_true, prob, task=task, n_bins=n_bins)
    edges, width = rc["bin_edges"], 1.0 / n_bins
    fig = _figure(5.0, 5.5)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    filled = rc["count"] > 0
    ax.bar(edges[:-1][filled], rc["frequency"][filled], width=width, align="edge", color="C0", alpha=0.6,
           edgecolor="C0", label="observed")
    ax.plot(rc["confidence"][filled], rc["frequency"][filled], "o-", color="C1", ms=4, label="bin mean")
    x_label = "top-label confidence" if task == "multiclass" else "predicted probability"
    ax.set(ylabel="accuracy" if task == "multiclass" else "observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=title or f"Reliability (ECE = {rc['ece']:.3f}, {n_bins} bins)")
    ax.legend(loc="upper left", fontsize="small")
    ax_n.bar(edges[:-1], rc["count"], width=width, align="edge", color="0.5")
    ax_n.set(xlabel=x_label, ylabel="count")
    return _save(fig, path)


def plot_confusion_matrix(
    path: str | os.PathLike,
    confusion_matrix: Any,
    label_names: Sequence[str],
    *,
    title: str | None = None,
) -> Path:
    """Confusion matrix of counts (rows: true class, columns: predicted), each cell annotated with its count
    and its row percentage."""
    cm = as_numpy(confusion_matrix, dtype=np.int64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(label_names) != k:
        raise ValueError(f"confusion_matrix must be square with one row per label name; got {cm.shape} and "
                         f"{len(label_names)} names.")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    size = max(4.0, 0.8 * k + 2.5)
    fig = _figure(size, size, constrained=True)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{100 * frac[i, j]:.0f}%", ha="center", va="center", fontsize="small",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels=list(label_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(label_names))
    ax.set(xlabel="predicted", ylabel="true", title=title or "Confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, label="row fraction")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------- learning curves
def load_history(history: str | os.PathLike | Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Training history as ``{column: float array}`` from a list of per-epoch dicts or a CSV file.

    Recognised columns: ``epoch, train_loss, val_loss, val_auc, lr``; missing or empty cells are NaN, and
    other columns are kept as they are when numeric.
    """
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="", encoding="utf-8") as fh:
            records: list[Mapping[str, Any]] = list(csv.DictReader(fh))
    else:
        records = list(history)
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)

    def _num(v: Any) -> float:
        try:
            return float(v) if v not in (None, "") else float("nan")
        except (TypeError, ValueError):
            return float("nan")

    out = {k: np.array([_num(r.get(k)) for r in records], dtype=np.float64) for k in keys}
    if "epoch" not in out:
        out["epoch"] = np.arange(1, len(records) + 1, dtype=np.float64)
    return out


def history_phases(history: str | os.PathLike | Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``phase`` of each epoch (``head``, ``finetune``, ``gradual`` …; segmentation runs: encoder frozen
    or trainable; ``""`` where not recorded)."""
    if isinstance(history, (str, os.PathLike)):
        with open(history, newline="", encoding="utf-8") as fh:
            history = list(csv.DictReader(fh))

    def phase(r: Mapping[str, Any]) -> str:
        if r.get("phase"):
            return str(r["phase"])
        trainable = str(r.get("encoder_trainable", ""))
        return {"True": "encoder trainable", "False": "encoder frozen"}.get(trainable, "")

    return [phase(r) for r in history]


def _mark_phases(axes: Sequence[Any], epoch: np.ndarray, phases: Sequence[str]) -> None:
    """A dashed vertical line between the last epoch of one phase and the first of the next, labelled with
    the new phase on the top panel."""
    for i in range(1, min(len(phases), len(epoch))):
        if phases[i] == phases[i - 1] or not phases[i]:
            continue
        x = (epoch[i - 1] + epoch[i]) / 2.0
        for ax in axes:
            ax.axvline(x, color="0.45", ls="--", lw=1)
        axes[0].annotate(phases[i], xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", ha="left", va="top", fontsize="x-small", color="0.3")


def learning_curves_figure(history: str | os.PathLike | Sequence[Mapping[str, Any]], *,
                           title: str | None = None) -> Any:
    """The learning-curves figure (see :func:`plot_learning_curves`), laid out so no label is cut off."""
    from matplotlib.ticker import MaxNLocator

    h = load_history(history)
    epoch = h["epoch"]

    def has(k: str) -> bool:
        return k in h and bool(np.isfinite(h[k]).any())

    panels = [p for p in (("train_loss", "val_loss"), ("val_auc", "val_dice_mean"), ("lr", "lr_encoder", "lr_decoder"))
              if any(has(k) for k in p)]
    if not panels:
        raise ValueError(f"history has none of the columns {HISTORY_COLUMNS[1:]}; got {sorted(h)}.")
    fig = _figure(5.5, 2.3 * len(panels) + 0.6, constrained=True)
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0])
    for ax, keys in zip(axes, panels):
        for k in keys:
            if has(k):
                ok = np.isfinite(h[k])
                ax.plot(epoch[ok], h[k][ok], marker="o", ms=3, label=k)
        if keys[0] == "lr":
            lr = np.concatenate([h[k][np.isfinite(h[k])] for k in keys if has(k)])
            if (lr > 0).all():
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            ax.set_ylabel("learning rate")
            if sum(has(k) for k in keys) > 1:
                ax.legend(fontsize="small")
        else:
            ax.set_ylabel("loss" if "loss" in keys[0] else "validation AUC" if has("val_auc") else "validation Dice")
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    _mark_phases(list(axes), epoch, history_phases(history))
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(title or "Learning curves")
    return fig


def plot_learning_curves(
    path: str | os.PathLike,
    history: str | os.PathLike | Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
) -> Path:
    """Losses, validation AUC and learning rate against epoch (panels without data are left out); dashed
    lines mark where a training phase (head, fine-tune, …) starts."""
    return _save(learning_curves_figure(history, title=title), path)


# -------------------------------------------------------------------------------------------- segmentation
def _pick_slice(true: np.ndarray, axis: int) -> int:
    area = (true > 0).sum(axis=tuple(a for a in range(true.ndim) if a != axis % true.ndim))
    return int(np.argmax(area)) if area.any() else true.shape[axis] // 2


def plot_segmentation_overlay(
    path: str | os.PathLike,
    cases: Sequence[tuple[str, Any, Any, Any]],
    *,
    label_names: Sequence[str] | Mapping[int, str] | None = None,
    axis: int = -1,
    slice_index: int | None = None,
    max_cases: int = 4,
    title: str | None = None,
) -> Path:
    """Image slice with reference (solid) and predicted (dashed) contours per label, one panel per case.

    ``cases`` holds ``(case_id, image, true_labelmap, pred_labelmap)``, 2D or 3D. For 3D the slice along
    ``axis`` is ``slice_index`` or, by default, the one with the largest reference foreground.
    """
    cases = list(cases)[:max_cases]
    if not cases:
        raise ValueError("plot_segmentation_overlay needs at least one case.")
    if isinstance(label_names, Mapping):
        names = {int(k): str(v) for k, v in label_names.items()}
    elif label_names is not None:
        names = {i: str(n) for i, n in enumerate(label_names) if i}
    else:
        names = {}
    fig = _figure(3.2 * len(cases), 3.6, constrained=True)
    axes = np.atleast_1d(fig.subplots(1, len(cases), squeeze=False)[0])
    for ax, (case_id, image, true, pred) in zip(axes, cases):
        img, t, p = as_numpy(image, np.float64), as_numpy(true), as_numpy(pred)
        if img.ndim == 3:
            k = slice_index if slice_index is not None else _pick_slice(t, axis)
            img, t, p = (np.take(a, k, axis=axis) for a in (img, t, p))
            case_title = f"{case_id} (slice {k})"
        else:
            case_title = str(case_id)
        ax.imshow(img.T, cmap="gray", origin="lower")
        labels = sorted((set(np.unique(t).tolist()) | set(np.unique(p).tolist())) - {0})
        for i, lab in enumerate(labels):
            color = f"C{i % 10}"
            for mask, style in ((t == lab, "solid"), (p == lab, "dashed")):
                if mask.any() and not mask.all():
                    ax.contour(mask.T.astype(float), levels=[0.5], colors=[color], linestyles=style,
                               linewidths=1.2, origin="lower")
            ax.plot([], [], color=color, label=names.get(int(lab), str(lab)))
        ax.set_title(case_title, fontsize="small")
        ax.set_axis_off()
    axes[0].legend(fontsize="x-small", loc="upper left", title="solid: true, dashed: pred",
                   title_fontsize="x-small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
