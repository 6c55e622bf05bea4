"""Small helpers shared by the metrics modules: array coercion, JSON-safe values, atomic writes."""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the data given (e.g. an AUC where only one class is present); NaN is returned."""


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Return ``x`` (list, NumPy array or torch tensor) as a NumPy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def nan_to_none(obj: Any) -> Any:
    """Recursively turn NaN/inf into ``None`` and NumPy scalars/arrays into plain Python, for strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [nan_to_none(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def _atomic_write(path: str | os.PathLike, writer: Callable[[Any], None], mode: str = "w") -> Path:
    """Write a file through ``writer(fileobj)`` into a temporary file next to ``path``, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kwargs = {"newline": ""} if "b" not in mode else {}
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}), **kwargs) as fh:
            writer(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (NaN written as ``null``) atomically."""
    clean = nan_to_none(obj)
    return _atomic_write(path, lambda fh: fh.write(json.dumps(clean, indent=2, allow_nan=False) + "\n"))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically."""
    return _atomic_write(path, lambda fh: fh.write(text))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, then ``os.replace``)."""
    return _atomic_write(path, lambda fh: fh.write(data), "wb")


def write_csv_atomic(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]) -> Path:
    """Write dict rows as CSV atomically; NaN and None are written as empty cells."""

    def _cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, (float, np.floating)) and not math.isfinite(float(v)):
            return ""
        if isinstance(v, np.generic):
            return v.item()
        return v

    def _writer(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=list(fieldnames))
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in fieldnames})

    return _atomic_write(path, _writer)


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
