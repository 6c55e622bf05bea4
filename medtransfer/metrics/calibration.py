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
from typing import Any

import numpy as np

from medtransfer.metrics._utils import as_numpy, binary_labels, positive_scores

logger = logging.getLogger(__name__)

__all__ = ["apply_temperature", "expected_calibration_error", "fit_temperature", "reliability_curve"]

_TASKS = ("binary", "multiclass", "multilabel")


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


def fit_temperature(logits_val: Any, y_val: Any, *, task: str | None = None, max_iter: int = 200) -> float:
    """Temperature ``T > 0`` minimising the validation negative log-likelihood of ``logits / T``.

    ``logits_val`` is (N,) or (N, 1) for a single-logit binary model (sigmoid), (N, C) for softmax models
    (binary with C=2 or multiclass) or, with ``task="multilabel"``, (N, C) sigmoid logits with missing labels
    as NaN or -1. Optimised with L-BFGS on ``log T``. Apply it with :func:`apply_temperature`.
    """
    import torch

    z = as_numpy(logits_val, dtype=np.float64)
    task = _infer_logit_task(z, task)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zt = torch.as_tensor(z, dtype=torch.float64)
    if task == "multilabel" or (task == "binary" and (z.ndim == 1 or z.shape[1] == 1)):
        if task == "binary":
            y = torch.as_tensor(binary_labels(y_val), dtype=torch.float64)
            zt = zt.reshape(-1)
            mask = torch.ones_like(y, dtype=torch.bool)
        else:
            y_np = as_numpy(y_val, dtype=np.float64)
            known = np.isfinite(y_np) & (y_np >= 0)
            y, mask = torch.as_tensor(np.where(known, y_np, 0.0)), torch.as_tensor(known)

        def nll() -> torch.Tensor:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(zt / log_t.exp(), y, reduction="none")
            return loss[mask].mean()
    else:
        y = torch.as_tensor(as_numpy(y_val).reshape(-1).astype(np.int64))
        if zt.ndim != 2 or zt.shape[0] != y.shape[0]:
            raise ValueError(f"logits must have shape (N, C) with N={y.shape[0]}, got {tuple(zt.shape)}.")

        def nll() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(zt / log_t.exp(), y)

    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll()
        loss.backward()
        return loss

    before = float(nll().detach())
    opt.step(closure)
    temperature = float(log_t.detach().exp())
    logger.info("temperature scaling: T=%.4f, NLL %.4f -> %.4f", temperature, before, float(nll().detach()))
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
