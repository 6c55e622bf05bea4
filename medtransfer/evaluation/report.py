"""The classification report of a run's validation and test predictions."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.metrics import write_classification_report


def report_task(results: dict[str, dict[str, Any]], label_names: list[str]) -> str:
    """The metrics family of the results: multilabel for 0/1 label vectors, else binary or multiclass."""
    if any(np.ndim(r["y"]) == 2 for r in results.values()):
        return "multilabel"
    return "binary" if len(label_names) == 2 else "multiclass"


def write_evaluation(run_dir: Path, results: dict[str, dict[str, Any]], label_names: list[str],
                     history: list[dict[str, Any]] | None, info: dict[str, Any] | None = None,
                     ordinal: bool = False) -> dict[str, Any]:
    """Metrics with patient-level CIs, the operating point chosen on validation and applied to test,
    per-image predictions, plots and the model card (see :mod:`medtransfer.metrics.report`)."""
    task = report_task(results, label_names)
    return write_classification_report(
        run_dir, val=results["val"], test=results.get("test"), label_names=label_names, task=task,
        history=history, extra_info=info, ordinal=ordinal and task == "multiclass", write_metrics=False,
    )
