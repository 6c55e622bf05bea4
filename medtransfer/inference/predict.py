"""Run a trained model over a folder of DICOM files: one output row per input file, always.

Every file under the folder (recursively, with or without a ``.dcm`` suffix) gets a row with a
status: ``ok`` (predicted), ``skipped`` (a valid DICOM object the model does not take: SR,
RTSTRUCT, multi-frame into a 2D model, …) or ``error`` (unreadable, not DICOM, broken pixel
data), and a reason. One bad file never stops the batch. The CSV is written atomically. No
patient names or birth dates are written.
"""
from __future__ import annotations

import os
from typing import Any

from medtransfer.inference.batch import BatchSummary, PredictOptions, run_batch
from medtransfer.run import load_run


def predict_folder(run_dir: str | os.PathLike[str], input_dir: str | os.PathLike[str],
                   out_csv: str | os.PathLike[str], options: PredictOptions | None = None, *,
                   device: str = "auto", **overrides: Any) -> BatchSummary:
    """Predict every file under ``input_dir`` with the model of ``run_dir``; write ``out_csv``.

    ``options`` / keyword ``overrides`` (``resume=True``, ``shard=(0, 4)``, …): see
    :class:`~medtransfer.inference.batch.PredictOptions`; :mod:`medtransfer.inference.batch` for
    streaming, workers, ``resume`` and ``shard``.
    """
    return run_batch(load_run(run_dir, device), input_dir, out_csv, options, **overrides)


PredictSummary = BatchSummary
