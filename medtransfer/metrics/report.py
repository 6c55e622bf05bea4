"""Run-directory reports: ``metrics.json``, prediction CSVs, plots and the model card, in one call."""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.metrics._utils import (
    as_numpy,
    nan_to_none,
    write_csv_atomic,
    write_json_atomic,
)
from medtransfer.metrics.calibration import _check_task, apply_temperature, expected_calibration_error, fit_temperature
from medtransfer.metrics.classification import (
    THRESHOLD_METHODS,
    choose_threshold,
    evaluate_classification,
    ordinal_grade,
    ordinal_metrics,
)
from medtransfer.metrics.model_card import write_model_card
from medtransfer.metrics.segmentation import SegmentationEvaluator

logger = logging.getLogger(__name__)

__all__ = ["write_classification_report", "write_segmentation_report"]

_FALLBACK_THRESHOLD = 0.5


def _split(d: Mapping[str, Any], name: str, task: str, n_classes: int) -> dict[str, Any]:
    """Validated copy of a split dict: y, prob (N, C), patient_ids (list or None), paths (list)."""
    for key in ("y", "prob"):
        if key not in d:
            raise ValueError(f"{name} is missing the key {key!r}; it needs 'y', 'prob', 'patient_ids' and 'paths'.")
    prob = as_numpy(d["prob"], dtype=np.float64)
    if task == "binary" and prob.ndim == 1:
        prob = np.column_stack([1.0 - prob, prob])
    if prob.ndim != 2 or prob.shape[1] != n_classes:
        raise ValueError(f"{name}['prob'] must have shape (N, {n_classes}) (one column per label name), "
                         f"got {prob.shape}.")
    y = as_numpy(d["y"])
    if task != "multilabel":
        y = y.reshape(-1)
    n = prob.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"{name}['y'] has {y.shape[0]} entries but {name}['prob'] has {n} rows.")
    ids = d.get("patient_ids")
    paths = d.get("paths")
    for key, seq in (("patient_ids", ids), ("paths", paths)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name}[{key!r}] has {len(seq)} entries but there are {n} predictions.")
    out = {"y": y, "prob": prob, "patient_ids": None if ids is None else list(ids),
           "paths": [""] * n if paths is None else [str(p) for p in paths]}
    if d.get("logits") is not None:
        out["logits"] = as_numpy(d["logits"], dtype=np.float64)
    return out


def _flatten_auc(block: dict[str, Any]) -> dict[str, Any]:
    """Split dict as written to metrics.json: ``auc`` a plain float, ``auc_ci`` = [low, high]."""
    auc = block.pop("auc")
    for key in ("operating_point", "task", "label_names"):  # kept once, at the top level of the report
        block.pop(key, None)
    return {"auc": auc["value"], "auc_ci": [auc.get("ci_low"), auc.get("ci_high")],
            "auc_ci_info": {k: v for k, v in auc.items() if k not in ("value", "ci_low", "ci_high")}, **block}


def _predictions_rows(s: Mapping[str, Any], names: list[str], task: str, threshold: float | np.ndarray | None,
                      ordinal: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    prob, y = s["prob"], s["y"]
    ids = s["patient_ids"] or [""] * len(y)
    prob_cols = [f"prob_{n}" for n in names]
    rows = []
    if task == "multilabel":
        label_cols, pred_cols = [f"label_{n}" for n in names], [f"pred_{n}" for n in names]
        thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(names),))
        for i in range(len(y)):
            row = {"path": s["paths"][i], "patient_id": ids[i]}
            row.update({c: (None if not (y[i, k] >= 0) else int(y[i, k])) for k, c in enumerate(label_cols)})
            row.update({c: float(prob[i, k]) for k, c in enumerate(prob_cols)})
            row.update({c: int(prob[i, k] >= thr[k]) for k, c in enumerate(pred_cols)})
            rows.append(row)
        return rows, ["path", "patient_id", *label_cols, *prob_cols, *pred_cols]
    if task == "binary":
        pred = (prob[:, 1] >= float(threshold)).astype(int)  # type: ignore[arg-type]
    elif ordinal:
        pred = ordinal_grade(prob)
    else:
        pred = prob.argmax(axis=1)
    for i in range(len(y)):
        row = {"path": s["paths"][i], "patient_id": ids[i], "label": int(y[i])}
        row.update({c: float(prob[i, k]) for k, c in enumerate(prob_cols)})
        row["predicted"] = int(pred[i])
        rows.append(row)
    return rows, ["path", "patient_id", "label", *prob_cols, "predicted"]


def _choose_thresholds(s: Mapping[str, Any], task: str, names: list[str], method: str,
                       target: float | None) -> tuple[Any, bool]:
    """Threshold(s) chosen on validation; falls back to 0.5 (flagged) where validation has one class."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if task == "binary":
            t: Any = choose_threshold(s["y"], s["prob"][:, 1], method=method, target=target)
            thresholds = np.array([t])
        else:
            y = s["y"].astype(np.float64)
            thresholds = np.array([
                choose_threshold(y[y[:, c] >= 0, c], s["prob"][y[:, c] >= 0, c], method=method, target=target)
                for c in range(len(names))
            ])
    fallback = bool(np.isnan(thresholds).any())
    if fallback:
        warnings.warn(
            f"The operating point could not be chosen on validation ({caught[0].message if caught else ''}); "
            f"using {_FALLBACK_THRESHOLD} instead. Add validation cases of both classes.",
            UserWarning, stacklevel=4)
        thresholds = np.where(np.isnan(thresholds), _FALLBACK_THRESHOLD, thresholds)
    return (float(thresholds[0]) if task == "binary" else thresholds), fallback


def write_classification_report(
    out_dir: str | os.PathLike,
    *,
    val: Mapping[str, Any] | None,
    test: Mapping[str, Any] | None,
    label_names: Sequence[str],
    task: str,
    history: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
    extra_info: Mapping[str, Any] | None = None,
    threshold: float | Sequence[float] | None = None,
    threshold_method: str = "youden",
    threshold_target: float | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    n_bins: int = 10,
    plots: bool = True,
    ordinal: bool = False,
    write_metrics: bool = True,
) -> dict[str, Any]:
    """Evaluate validation and test predictions and write the report files into ``out_dir``.

    ``val``/``test`` hold ``y`` (labels), ``prob`` ((N, C) class probabilities; binary C=2 or (N,) for the
    positive class), ``patient_ids`` (list or None) and ``paths`` (list), and optionally ``logits`` for
    temperature scaling (fitted on val, reported on test). The operating point is chosen on val with
    ``threshold_method`` (``youden``, ``sensitivity`` or ``specificity`` with ``threshold_target``) and applied
    unchanged to test (binary: one threshold; multilabel: one per class; multiclass: argmax).

    Writes ``metrics.json``, ``predictions_val.csv``/``predictions_test.csv`` (``path, patient_id, label,
    prob_<label>..., predicted``; multilabel: ``label_<name>``/``pred_<name>`` columns), ``plots/*.png``,
    ``model_card.md`` (from ``extra_info`` + the metrics; see :func:`write_model_card`); ``report.html`` is
    written last by whoever owns the folder (:func:`medtransfer.run.report.finish_report`).
    ``write_metrics=False`` leaves ``metrics.json`` to the caller (a run directory writes it once, with
    what it adds).

    Returns the dict written to ``metrics.json``: ``task, label_names, val, test`` (None without a test set),
    ``operating_point``, ``calibration``, ``plots``. ``val``/``test`` hold the keys of
    :func:`evaluate_classification` except that ``auc`` is a plain float (None if undefined) with
    ``auc_ci = [low, high]`` and ``auc_ci_info`` beside it. Undefined values are None.

    ``ordinal=True`` (a multiclass task whose classes are grades, e.g. from ``model.task=ordinal``) adds
    ``ordinal`` to each split: quadratic weighted kappa and grade MAE of the median grade with bootstrap
    CIs over patients; temperature scaling is skipped (the model's logits are cumulative, not per class).

    ``threshold`` fixes the operating point instead (e.g. the one a training run chose on its own
    validation set, when a trained model is evaluated on new data); ``val`` may then be None.
    """
    _check_report_args(val, test, task, threshold, threshold_method, ordinal)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in label_names]
    splits = {"val": _split(val, "val", task, len(names))} if val is not None else {}
    if test is not None:
        splits["test"] = _split(test, "test", task, len(names))
    threshold, op = _operating_point(splits.get("val"), task, names, threshold, threshold_method, threshold_target,
                                     ordinal)
    metrics: dict[str, Any] = {"task": task, "label_names": names, "val": None, "test": None}
    if ordinal:
        metrics["ordered_classes"] = True
    for name, s in splits.items():
        prob_arg = s["prob"][:, 1] if task == "binary" else s["prob"]
        ev = evaluate_classification(s["y"], prob_arg, task=task, label_names=names, patient_ids=s["patient_ids"],
                                     threshold=threshold, n_boot=n_boot, seed=seed, alpha=alpha, n_bins=n_bins)
        if task != "multiclass":
            op[name] = ev.get("operating_point")
        metrics[name] = _flatten_auc(ev)
        if ordinal:
            metrics[name]["ordinal"] = ordinal_metrics(s["y"], s["prob"], s["patient_ids"], n_boot, alpha, seed)
        rows, cols = _predictions_rows(s, names, task, threshold, ordinal)
        write_csv_atomic(out / f"predictions_{name}.csv", rows, cols)
    metrics["operating_point"] = op
    metrics["calibration"] = _calibration(splits, metrics, task, n_bins, ordinal)
    metrics["plots"] = _classification_plots(out, splits, task, names, metrics, history, n_boot, alpha, seed,
                                             n_bins) if plots else []
    metrics = nan_to_none(metrics)
    if write_metrics:
        write_json_atomic(out / "metrics.json", metrics)
    write_model_card(out / "model_card.md", info={**(extra_info or {}), "metrics": metrics,
                                                  "task": task, "label_names": names})
    logger.info("classification report written to %s", out)
    return metrics


def _check_report_args(val: Any, test: Any, task: str, threshold: Any, threshold_method: str, ordinal: bool) -> None:
    _check_task(task)
    if val is None and (threshold is None and task != "multiclass"):
        raise ValueError("Without a validation set, pass the fixed operating point as threshold=.")
    if val is None and test is None:
        raise ValueError("Nothing to evaluate: both val and test are None.")
    if ordinal and task != "multiclass":
        raise ValueError("ordinal=True needs task='multiclass' (graded classes).")
    if threshold_method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold_method must be one of {', '.join(THRESHOLD_METHODS)}; got {threshold_method!r}.")


def _operating_point(val: Mapping[str, Any] | None, task: str, names: list[str], threshold: Any, method: str,
                     target: float | None, ordinal: bool) -> tuple[Any, dict[str, Any]]:
    """The decision rule applied to every split and its ``operating_point`` entry: argmax (or the median
    grade) for multi-class, the ``threshold`` given, or one chosen on ``val``."""
    if task == "multiclass":
        return None, {"method": "median grade (ordinal)" if ordinal else "argmax", "chosen_on": None, "threshold": None}
    if threshold is not None:
        threshold = float(threshold) if task == "binary" else np.asarray(threshold, dtype=np.float64)
        op: dict[str, Any] = {"method": "fixed", "chosen_on": "given (the training run's validation set)",
                              "fallback": False}
    else:
        threshold, fallback = _choose_thresholds(val, task, names, method, target)
        op = {"method": method, "target": target, "chosen_on": "val", "fallback": fallback}
    op["threshold"] = threshold if task == "binary" else dict(zip(names, np.asarray(threshold).tolist()))
    if task == "binary":
        op["positive_label"] = names[1]
    return threshold, op


def _calibration(splits: Mapping[str, Any], metrics: Mapping[str, Any], task: str, n_bins: int,
                 ordinal: bool) -> dict[str, Any]:
    """ECE of each split, and temperature scaling fitted on val and reported on test where both have logits."""
    calib: dict[str, Any] = {"n_bins": n_bins, "binning": "equal-width",
                             **{f"ece_{k}": (metrics[k] or {}).get("ece") for k in ("val", "test")}}
    if not ordinal and "logits" in splits.get("val", {}) and "logits" in splits.get("test", {}):
        temp = fit_temperature(splits["val"]["logits"], splits["val"]["y"], task=task)
        calibrated = apply_temperature(splits["test"]["logits"], temp, task=task)
        calib["temperature"] = temp
        calib["ece_test_after_temperature"] = expected_calibration_error(
            splits["test"]["y"], calibrated, task=task, n_bins=n_bins)
    return calib


def _classification_plots(out: Path, splits: Mapping[str, Any], task: str, names: list[str],
                          metrics: Mapping[str, Any], history: Any, n_boot: int, alpha: float, seed: int,
                          n_bins: int) -> list[str]:
    from medtransfer.metrics import plots as P

    written: list[Path] = []
    pdir = out / "plots"
    for name, s in splits.items():
        y, prob = s["y"], s["prob"]
        p_arg = prob[:, 1] if task == "binary" else prob
        op = nan_to_none((metrics.get("operating_point") or {}).get(name)) if task == "binary" else None
        if task == "binary" and np.unique(y).size < 2:  # e.g. a set of confirmed cases only
            logger.warning("%s: ROC and precision-recall curves not plotted, only one class is present", name)
        else:
            written.append(P.plot_roc(pdir / f"roc_{name}.png", y, p_arg, task=task, label_names=names,
                                      groups=s["patient_ids"], n_boot=min(n_boot, 200), alpha=alpha, seed=seed,
                                      operating_point=op, title=f"ROC ({name})"))
            written.append(P.plot_precision_recall(pdir / f"pr_{name}.png", y, p_arg, task=task,
                                                   label_names=names, title=f"Precision-recall ({name})"))
        written.append(P.plot_reliability(pdir / f"reliability_{name}.png", y, p_arg, task=task, n_bins=n_bins,
                                          title=None))
        block = metrics.get(name) or {}
        cm = block.get("confusion_matrix") if task == "multiclass" else (op or {}).get("confusion_matrix")
        if cm is not None:
            written.append(P.plot_confusion_matrix(pdir / f"confusion_{name}.png", cm, names,
                                                   title=f"Confusion matrix ({name})"))
    if history is not None:
        try:
            written.append(P.plot_learning_curves(pdir / "learning_curves.png", history))
        except ValueError as exc:
            warnings.warn(f"Learning curves not plotted: {exc}", UserWarning, stacklevel=3)
    return [str(p.relative_to(out)) for p in written]


def write_segmentation_report(
    out_dir: str | os.PathLike,
    *,
    cases: Sequence[tuple[str, Any, Any, Any]],
    label_names: Sequence[str] | Mapping[int, str],
    split: str = "test",
    nsd_tolerance_mm: float | Sequence[float] = 1.0,
    images: Mapping[str, Any] | None = None,
    n_overlay: int = 4,
    n_boot: int = 1000,
    seed: int = 0,
    extra_info: Mapping[str, Any] | None = None,
    write_metrics: bool = True,
) -> dict[str, Any]:
    """Score ``(case_id, pred, true, spacing)`` cases and write the segmentation report into ``out_dir``
    (``write_metrics=False``: ``metrics.json`` is left to the caller, e.g. the run directory).

    Writes ``segmentation_<split>.csv`` (one row per case, see
    :class:`~medtransfer.metrics.segmentation.SegmentationEvaluator`), ``metrics.json`` =
    ``{"task": "segmentation", "label_names": ..., split: summary, "plots": [...]}``, an overlay figure of the
    first ``n_overlay`` cases when ``images`` (case_id -> image array) is given, and ``model_card.md``.
    Returns the dict written to ``metrics.json``.
    """
    out = Path(out_dir)
    ev = SegmentationEvaluator(label_names, nsd_tolerance_mm=nsd_tolerance_mm, n_boot=n_boot, seed=seed)
    cases = list(cases)
    for case_id, pred, true, spacing in cases:
        ev.update(case_id, pred, true, spacing)
    rows, summary = ev.aggregate()
    write_csv_atomic(out / f"segmentation_{split}.csv", rows, ev.columns)
    plots: list[str] = []
    if images:
        from medtransfer.metrics.plots import plot_segmentation_overlay

        chosen = [(cid, images[cid], true, pred) for cid, pred, true, _ in cases if cid in images][:n_overlay]
        if chosen:
            p = plot_segmentation_overlay(out / "plots" / f"overlay_{split}.png", chosen, label_names=label_names)
            plots.append(str(p.relative_to(out)))
    names = list(ev.labels_.values())
    metrics = nan_to_none({"task": "segmentation", "label_names": names, split: summary, "plots": plots})
    if write_metrics:
        write_json_atomic(out / "metrics.json", metrics)
    write_model_card(out / "model_card.md", info={**(extra_info or {}), "task": "segmentation",
                                                  "label_names": names, "metrics": {**summary}})
    if math.isnan(float(summary.get("mean_dice") or float("nan"))):
        logger.warning("no label could be scored (every label empty in every case)")
    return metrics
