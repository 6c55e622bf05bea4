"""Calibration: reliability curve, expected calibration error (ECE) and temperature scaling.

Binning convention (used everywhere in medtransfer): ``n_bins`` equal-width bins on [0, 1]; bin ``k`` holds
scores in ``[k/n_bins, (k+1)/n_bins)``, the last bin also holds 1.0.
What is binned depends on the task:

* binary: the positive-class probability against the observed frequency of positives;
* multiclass: the top-label confidence (max probability) against accuracy (Guo et al., ICML 2017);
* multilabel: every (image, class) pair with a known label, pooled, as in the binary case.

``ECE = sum_k (n_k / N) * |frequency_k - confidence_k|`` over non-empty bins.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

from medtransfer.metrics._utils import as_numpy, binary_labels, positive_scores

logger = logging.getLogger(__name__)

__all__ = ["apply_temperature", "expected_calibration_error", "fit_temperature", "reliability_curve"]

_TASKS = ("binary", "multiclass", "multilabel")
_T_MIN, _T_MAX = 1e-2, 1e3  # search range of the temperature


def _check_task(task: str) -> str:
    if task not in _TASKS:
        from medtransfer._suggest import did_you_mean

        raise ValueError(f"Unknown task {task!r}.{did_you_mean(str(task), _TASKS)} Valid tasks: {', '.join(_TASKS)}.")
    return task


def _confidence_and_outcome(y_true: Any, prob: Any, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat (confidence, outcome in {0,1}) pairs that the reliability curve bins (see module docstring)."""
    _check_task(task)
    if task == "binary":
        return positive_scores(prob), binary_labels(y_true).astype(np.float64)
    p = as_numpy(prob, dtype=np.float64)
    if task == "multiclass":
        y = as_numpy(y_true).reshape(-1).astype(np.int64)
        if p.ndim != 2 or p.shape[0] != y.shape[0]:
            raise ValueError(f"prob must have shape (N, C) with N={y.shape[0]}, got {p.shape}.")
        return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    y = as_numpy(y_true, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"multilabel y and prob must have the same shape (N, C); got {y.shape} and {p.shape}.")
    known = np.isfinite(y) & (y >= 0)
    return p[known], y[known]


def reliability_curve(y_true: Any, prob: Any, *, task: str = "binary", n_bins: int = 10) -> dict[str, Any]:
    """Per-bin mean confidence, observed frequency and count (equal-width bins, see module docstring).

    Returns a dict with ``bin_edges`` (n_bins + 1), ``confidence``, ``frequency`` (NaN for empty bins),
    ``count`` (ints), ``n`` and ``ece``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    conf, outcome = _confidence_and_outcome(y_true, prob, task)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.floor(conf * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=n_bins) / count
        frequency = np.bincount(idx, weights=outcome, minlength=n_bins) / count
    n = int(conf.size)
    filled = count > 0
    ece = float(np.sum(count[filled] / n * np.abs(frequency[filled] - confidence[filled]))) if n else float("nan")
    return {
        "bin_edges": edges,
        "confidence": confidence,
        "frequency": frequency,
        "count": count,
        "n": n,
        "ece": ece,
    }


def expected_calibration_error(y_true: Any, prob: Any, *, task: str = "binary", n_bins: int = 10) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (0 = perfectly calibrated)."""
    return float(reliability_curve(y_true, prob, task=task, n_bins=n_bins)["ece"])


def _infer_logit_task(logits: np.ndarray, task: str | None) -> str:
    if task is not None:
        return _check_task(task)
    return "binary" if logits.ndim == 1 or logits.shape[1] == 1 else "multiclass"


def _nll_and_grad(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None, softmax: bool, beta: float
                  ) -> tuple[float, float]:
    """Mean NLL of ``beta * z`` and its derivative in ``beta`` (sigmoid per entry, or softmax per row)."""
    if softmax:
        bz = beta * z
        m = bz.max(axis=1, keepdims=True)
        e = np.exp(bz - m)
        lse = m[:, 0] + np.log(e.sum(axis=1))
        zy = z[np.arange(z.shape[0]), y]
        p = e / e.sum(axis=1, keepdims=True)
        return float(np.mean(lse - beta * zy)), float(np.mean((p * z).sum(axis=1) - zy))
    zz, yy = (z[mask], y[mask]) if mask is not None else (z, y)
    bz = beta * zz
    sig = 0.5 * (1.0 + np.tanh(0.5 * bz))
    return float(np.mean(np.logaddexp(0.0, bz) - yy * bz)), float(np.mean((sig - yy) * zz))


def fit_temperature(logits_val: Any, y_val: Any, *, task: str | None = None) -> float:
    """Temperature ``T > 0`` minimising the validation negative log-likelihood of ``logits / T``.

    ``logits_val`` is (N,) or (N, 1) for a single-logit binary model (sigmoid), (N, C) for softmax models
    (binary with C=2 or multiclass) or, with ``task="multilabel"``, (N, C) sigmoid logits with missing labels
    as NaN or -1. Optimised with L-BFGS-B (SciPy) on ``log T`` with the exact gradient, T in [0.01, 1000]. Apply it with
    :func:`apply_temperature`.
    """
    from scipy.optimize import minimize

    z = as_numpy(logits_val, dtype=np.float64)
    task = _infer_logit_task(z, task)
    mask = None
    if task == "binary" and (z.ndim == 1 or z.shape[1] == 1):
        softmax, z, y = False, z.reshape(-1), binary_labels(y_val).astype(np.float64)
    elif task == "multilabel":
        y_raw = as_numpy(y_val, dtype=np.float64)
        mask = np.isfinite(y_raw) & (y_raw >= 0)
        softmax, y = False, np.where(mask, y_raw, 0.0)
    else:
        softmax, y = True, as_numpy(y_val).reshape(-1).astype(np.int64)
        if z.ndim != 2 or z.shape[0] != y.shape[0]:
            raise ValueError(f"logits must have shape (N, C) with N={y.shape[0]}, got {z.shape}.")
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"logits and labels differ in length: {z.shape[0]} and {y.shape[0]}.")

    def objective(u: np.ndarray) -> tuple[float, np.ndarray]:
        beta = float(np.exp(-u[0]))  # beta = 1 / T, T = exp(u)
        nll, d_beta = _nll_and_grad(z, y, mask, softmax, beta)
        return nll, np.array([-beta * d_beta])

    bounds = [(np.log(_T_MIN), np.log(_T_MAX))]
    res = minimize(objective, x0=np.zeros(1), jac=True, method="L-BFGS-B", bounds=bounds)
    temperature = float(np.exp(res.x[0]))
    if not _T_MIN * 1.01 < temperature < _T_MAX / 1.01:
        warnings.warn(f"Temperature scaling hit its bound (T={temperature:.3g}): the validation logits carry "
                      "almost no information about the labels (or are degenerate); check the model.",
                      UserWarning, stacklevel=2)
    logger.info("temperature scaling: T=%.4f, NLL %.4f -> %.4f", temperature, objective(np.zeros(1))[0], res.fun)
    return temperature


def apply_temperature(logits: Any, temperature: float, *, task: str | None = None) -> np.ndarray:
    """Probabilities from ``logits / temperature``: sigmoid for (N,)/(N, 1) or multilabel, softmax otherwise.

    A single-logit binary input returns the (N,) positive-class probability.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    z = as_numpy(logits, dtype=np.float64) / float(temperature)
    task = _infer_logit_task(z, task)
    if task == "multilabel" or (task == "binary" and (z.ndim == 1 or z.shape[1] == 1)):
        out = 1.0 / (1.0 + np.exp(-z))
        return out.reshape(-1) if task == "binary" else out
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
