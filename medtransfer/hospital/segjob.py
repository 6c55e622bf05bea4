"""A segmentation run over a PACS: one row per series, the mask written back as DICOM SEG.

Each retrieved series goes through :func:`medtransfer.segmentation.predict_segmentation` as a
DICOM series folder would; its SEG (written by :mod:`medtransfer.segmentation.writers`, patient and
study from the source images, referencing every source instance) gets stable UIDs and is
delivered like a report; the NIfTI mask is kept beside it.
"""
from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from medtransfer.hospital.pipeline import (
    PacsJobOptions,
    PacsSummary,
    progress_bar,
    query_units,
    quiet_logger,
    settle_unit,
    spool_folder,
)
from medtransfer.hospital.results import ResultSink
from medtransfer.hospital.rows import RowLog, segmentation_fields, unit_row
from medtransfer.hospital.selection import Unit
from medtransfer.hospital.spool import Chunk, Prefetcher, make_chunks
from medtransfer.hospital.sr import file_sha256, stable_uid
from medtransfer.inference.batch import finish_outputs

logger = logging.getLogger(__name__)


def _stable_seg(path: Path, sha: str, unit: Unit, model_name: str):
    """The SEG file as a dataset whose UIDs derive from the model and the source series."""
    import pydicom

    ds = pydicom.dcmread(path)
    uid = stable_uid(sha, unit.series_uid, "seg")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesInstanceUID = stable_uid(sha, unit.study_uid, "seg-series")
    ds.SeriesDescription = f"medtransfer {model_name}"[:64]
    for segment in ds.SegmentSequence:
        segment.SegmentAlgorithmName = model_name[:64]
    return ds


def _seg_row(unit: Unit, seg_row: dict[str, Any], sink: ResultSink, sha: str, model_name: str) -> dict[str, Any]:
    row = unit_row(unit, seg_row["status"], seg_row.get("reason", ""), with_files=True)
    row.update({k: v for k, v in seg_row.items() if k.startswith("volume_ml_")})
    if seg_row.get("mask_nifti"):
        os.replace(seg_row["mask_nifti"], sink.folder / f"{unit.series_uid}.seg.nii.gz")
    if seg_row.get("mask_dicom_seg"):
        ds = _stable_seg(Path(seg_row["mask_dicom_seg"]), sha, unit, model_name)
        sink.deliver(f"{unit.series_uid}.seg.dcm", ds)
        row["seg_sop_instance_uid"] = str(ds.SOPInstanceUID)
    return row


def segment_chunk(run_dir: Path, chunk: Chunk, opts: PacsJobOptions, sink: ResultSink, sha: str) -> list[dict]:
    """Rows of one retrieved chunk of series (SEG delivered before its row is written)."""
    from medtransfer.segmentation.inference import predict_segmentation

    settled = {u.key: settle_unit(chunk, u, opts.selection, per_series=True) for u in chunk.units}
    todo = [u for u in chunk.units if settled[u.key] is None]
    seg_rows: dict[str, dict[str, Any]] = {}
    if todo:
        out = chunk.folder.with_name(chunk.folder.name + "-seg")
        with quiet_logger("medtransfer.segmentation.inference"):
            found = predict_segmentation(run_dir, [chunk.folder / u.series_uid for u in todo], out)
        seg_rows = {Path(r["input"].split("#")[0]).name: r for r in found}
    rows = []
    for unit in chunk.units:
        if settled[unit.key]:
            rows.append(unit_row(unit, *settled[unit.key], with_files=True))
        elif unit.series_uid in seg_rows:
            rows.append(_seg_row(unit, seg_rows[unit.series_uid], sink, sha, Path(run_dir).resolve().name))
        else:
            rows.append(unit_row(unit, "error", "not segmented: the retrieved files gave no row", True))
    if todo:
        shutil.rmtree(chunk.folder.with_name(chunk.folder.name + "-seg"), ignore_errors=True)
    return rows


def predict_segmentation_pacs(run_dir: str | os.PathLike[str], pacs, query: Future,
                              out_csv: str | os.PathLike[str], sink: ResultSink, opts: PacsJobOptions) -> PacsSummary:
    """Segment every series a PACS query finds with a segmentation run; SEG to the sink."""
    from medtransfer.segmentation.inference import load_run

    _, ckpt = load_run(run_dir)
    run_dir = Path(run_dir)
    sha = file_sha256(run_dir / "model.pt")
    units, series_sizes = query_units(pacs, query, opts, per_series=True)
    with RowLog(out_csv, segmentation_fields(ckpt["label_names"]), opts.resume, [u.key for u in units]) as table:
        todo = [u for u in units if u.key not in table.done]
        bar, task = progress_bar(opts.progress, len(todo))
        with bar, Prefetcher(pacs, make_chunks(todo, opts.chunk_size), series_sizes,
                             spool_folder(out_csv, opts.spool_dir)) as chunks:
            for chunk in chunks:
                table.write(segment_chunk(run_dir, chunk, opts, sink, sha))
                bar.advance(task, len(chunk.units))
    if opts.predict.parquet:
        finish_outputs(table.out, None, replace(opts.predict, study_json_dir=None))
    logger.info("%d series: %s -> %s", sum(table.counts.values()), dict(table.counts), table.out)
    return PacsSummary(table.out, table.counts, sink.folder, sink.counts, sink.failures)
