"""Small helpers shared by the metrics modules: array coercion, JSON-safe values, atomic writes."""
from __future__ import annotations

from typing import Any

import numpy as np


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the data given (e.g. an AUC where only one class is present); NaN is returned."""


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Return ``x`` (list, NumPy array or torch tensor) as a NumPy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


from medtransfer.utils.atomic import json_safe as nan_to_none  # noqa: E402,F401  (one implementation)
from medtransfer.utils.atomic import write_bytes_atomic, write_csv_atomic, write_json_atomic, write_text_atomic  # noqa: E402,F401


def binary_labels(y: Any, name: str = "y") -> np.ndarray:
    """Return binary labels as a flat int array of 0/1; accepts (N,), (N, 1) and booleans."""
    arr = as_numpy(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must have shape (N,) or (N, 1) for a binary task, got {arr.shape}.")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    values = np.unique(arr)
    if not np.isin(values, [0, 1]).all():
        raise ValueError(
            f"{name} must contain only 0 and 1 for a binary task, found values {values[:10].tolist()}. "
            "Map the positive class to 1 (or use task='multiclass')."
        )
    return arr.astype(np.int64)


def positive_scores(prob: Any, name: str = "prob") -> np.ndarray:
    """Return the positive-class score of a binary prediction: (N,) as is, (N, 1) or the last column of (N, 2)."""
    arr = as_numpy(prob, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] in (1, 2):
        arr = arr[:, -1]
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must have shape (N,), (N, 1) or (N, 2) for a binary task, got {arr.shape}."
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf; check the model outputs before computing metrics.")
    return arr
