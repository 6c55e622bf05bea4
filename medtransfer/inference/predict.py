"""Run a trained model over a folder of DICOM files: one output row per input file, always.

Every file under the folder (recursively, with or without a ``.dcm`` suffix) gets a row with a
status: ``ok`` (predicted), ``skipped`` (a valid DICOM object the model does not take: SR,
RTSTRUCT, multi-frame into a 2D model, …) or ``error`` (unreadable, not DICOM, broken pixel
data), and a reason. One bad file never stops the batch. The CSV is written atomically. No
patient names or birth dates are written.
"""
from __future__ import annotations

import os

from medtransfer.inference.batch import BatchSummary, SeriesFilter, run_batch
from medtransfer.run import load_run


def predict_folder(
    run_dir: str | os.PathLike[str],
    input_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    *,
    workers: int = 0,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    series_filter: SeriesFilter | None = None,
    parquet: bool = False,
    study_json_dir: str | os.PathLike[str] | None = None,
    patient_fields: bool = False,
) -> BatchSummary:
    """Predict every file under ``input_dir`` with the model of ``run_dir``; write ``out_csv``.

    See :mod:`medtransfer.inference.batch` for streaming, workers, ``resume`` and ``shard``.
    """
    run = load_run(run_dir, device)
    return run_batch(run, input_dir, out_csv, batch_size=batch_size, workers=workers, resume=resume,
                     shard=shard, series_filter=series_filter, parquet=parquet, progress=progress,
                     study_json_dir=study_json_dir, patient_fields=patient_fields)


PredictSummary = BatchSummary
