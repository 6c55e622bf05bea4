"""``predict`` from a PACS: query, select, retrieve chunk by chunk, predict, write rows and reports.

The rows are those ``predict`` writes for a folder (the same columns, ``path`` being the instance's
place ``studies/<uid>/series/<uid>/instances/<uid>``), one per instance the query found (per series
for 3D and segmentation models): ``ok``, ``skipped`` (the selection; decided on the query's answers
where they suffice, before any retrieval) or ``error`` (``not retrievable``, ``timed out``,
``rejected``: what the PACS or the network said). Retrieved instances go through
:func:`medtransfer.inference.batch.run_batch` exactly as files in a folder do, a chunk at a time.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medtransfer.hospital.reports import ReportBook, fetch_identity
from medtransfer.hospital.results import ResultSink
from medtransfer.hospital.rows import RowLog, classification_fields, unit_row
from medtransfer.hospital.selection import HeaderRange, Selection, Unit, plan_units, shard_by_study
from medtransfer.hospital.spool import Chunk, Prefetcher, make_chunks
from medtransfer.hospital.sr import model_identity
from medtransfer.inference.batch import PredictOptions, finish_outputs

logger = logging.getLogger(__name__)


@dataclass
class PacsJobOptions:
    """How a PACS job runs: the batch options every engine shares (:class:`PredictOptions`: batch size,
    workers, resume, shard, the selection filters, patient fields, parquet, study JSON, progress), the
    numeric ranges on header attributes, and the retrieval chunk."""

    predict: PredictOptions = field(default_factory=PredictOptions)
    ranges: tuple[HeaderRange, ...] = ()
    chunk_size: int = 64
    spool_dir: str | None = None

    @property
    def selection(self) -> Selection:
        return Selection(self.predict.series_filter, self.ranges)

    @property
    def resume(self) -> bool:
        return self.predict.resume

    @property
    def shard(self) -> tuple[int, int] | None:
        return self.predict.shard

    @property
    def progress(self) -> bool:
        return self.predict.progress

    @property
    def patient_fields(self) -> bool:
        return self.predict.patient_fields


@dataclass
class PacsSummary:
    out_csv: Path
    counts: Counter
    results_dir: Path
    results: Counter
    """Result objects: ``written``, ``sent``, ``send failed``, ``report failed``."""
    result_failures: list[str]

    @property
    def n_ok(self) -> int:
        return self.counts.get("ok", 0)


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Per-chunk INFO lines of a library module are not the job's news."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _headers(chunk: Chunk, unit: Unit) -> list:
    import pydicom

    return [pydicom.dcmread(chunk.path_of(rec), stop_before_pixels=True) for rec in unit.records]


def _discard(chunk: Chunk, unit: Unit, per_series: bool) -> None:
    if per_series:
        shutil.rmtree(chunk.folder / unit.series_uid, ignore_errors=True)
        return
    for rec in unit.records:
        chunk.path_of(rec).unlink(missing_ok=True)


def settle_unit(chunk: Chunk, unit: Unit, selection: Selection, per_series: bool) -> tuple[str, str] | None:
    """``(status, reason)`` for a unit that reaches no model: skipped by the selection before or after
    retrieval (ranges the query did not answer), or not retrieved. ``None``: it goes to the model."""
    if unit.status:
        return unit.status, unit.reason
    failed = [chunk.failures[rec.sop_uid] for rec in unit.records if rec.sop_uid in chunk.failures]
    if failed:
        _discard(chunk, unit, per_series)
        n = len(unit.records)
        return "error", failed[0] + (f" ({len(failed)} of {n} instances)" if n > 1 else "")
    if selection.needs_header_check(unit.records):
        for header in _headers(chunk, unit):
            why = selection.header_reason(header)
            if why:
                _discard(chunk, unit, per_series)
                return "skipped", why
    return None


def _batch_rows(run, chunk: Chunk, opts: PacsJobOptions) -> dict[str, dict[str, Any]]:
    """Rows of :func:`run_batch` over the chunk's folder, by the spool path they name."""
    from medtransfer.inference.batch import run_batch

    chunk_options = replace(opts.predict, resume=False, shard=None, parquet=False, study_json_dir=None,
                            progress=False)  # those apply to the job's table, not to a chunk's
    with quiet_logger("medtransfer.inference.batch"):
        summary = run_batch(run, chunk.folder, chunk.folder.with_suffix(".csv"), chunk_options, keep_rows=True)
    return {row["path"]: row for row in summary.rows or []}


def _row_for(unit: Unit, chunk: Chunk, batch: dict[str, dict[str, Any]], per_series: bool) -> dict[str, Any]:
    """The batch row of ``unit``, renamed from its spool path to the unit's key."""
    spool = str(chunk.folder / unit.series_uid) if per_series else str(chunk.path_of(unit.records[0]))
    row = batch.get(spool)
    if row is None and per_series:  # files of the series that formed no volume: their first row says why
        row = next((r for p, r in batch.items() if p.startswith(spool + os.sep) or p.startswith(spool + "#")), None)
    if row is None:
        return unit_row(unit, "error", "not predicted: the retrieved files gave no row", per_series)
    row = dict(row, path=unit.key)
    if per_series:
        row["files"] = ";".join(rec.key for rec in unit.records)
    return row


def note_sources(book: ReportBook, chunk: Chunk, unit: Unit) -> None:
    """What the report needs from retrieved headers: the study's identity, SOP classes the query omitted."""
    import pydicom

    missing = [rec for rec in unit.records if not rec.sop_class_uid]
    if unit.study_uid not in book.identities:
        book.remember_identity(unit.study_uid, pydicom.dcmread(chunk.path_of(unit.records[0]), stop_before_pixels=True))
    for rec in missing:
        header = pydicom.dcmread(chunk.path_of(rec), stop_before_pixels=True, specific_tags=["SOPClassUID"])
        book.sop_classes[rec.sop_uid] = str(header.SOPClassUID)


def predict_chunk(run, chunk: Chunk, opts: PacsJobOptions, per_series: bool, book: ReportBook | None) -> list[dict]:
    """The rows of one retrieved chunk, in the order of its units."""
    settled = {u.key: settle_unit(chunk, u, opts.selection, per_series) for u in chunk.units}
    todo = [u for u in chunk.units if settled[u.key] is None]
    if book is not None:
        for unit in todo:
            note_sources(book, chunk, unit)
    batch = _batch_rows(run, chunk, opts) if todo else {}
    rows = []
    for unit in chunk.units:
        status = settled[unit.key]
        rows.append(unit_row(unit, *status, per_series) if status else _row_for(unit, chunk, batch, per_series))
    return rows


@contextlib.contextmanager
def query_in_background(pacs, selection: Selection) -> Iterator[Future]:
    """The job's QIDO-RS / C-FIND for ``selection``, run in a thread while the model loads (on a large
    archive the query takes a second or more). The query has ended when the block does, also when
    the block fails, so it never outlives the job's connection."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacs-query")
    try:
        yield pool.submit(pacs.query, selection.query_fields(), [r.keyword for r in selection.ranges])
    finally:
        pool.shutdown(wait=True)


def query_units(pacs, query: Future, opts: PacsJobOptions, per_series: bool) -> tuple[list[Unit], Counter]:
    """The job's work units (sharded) and the number of instances of each series the query found
    (``query``: from :func:`query_in_background`; its error, a :class:`PacsError`, is raised here)."""
    records = query.result()
    logger.info("%s: the query found %d instance(s) in %d series", pacs.describe(), len(records),
                len({r.series_uid for r in records}))
    units = shard_by_study(plan_units(records, per_series, opts.selection), opts.shard)
    return units, Counter(r.series_uid for r in records)


def spool_folder(out_csv: str | os.PathLike[str], spool_dir: str | None) -> Path:
    """``.OUT.spool`` beside the table (or under ``spool_dir``): one per table, so a job's leftovers
    are found and removed by the next job on the same table."""
    out = Path(out_csv)
    return Path(spool_dir or out.parent) / f".{out.name}.spool"


def progress_bar(enabled: bool, total: int):
    from rich.progress import Progress

    bar = Progress(disable=not enabled, transient=True)
    return bar, bar.add_task("retrieving and predicting", total=total)


def predict_classification(run, pacs, query: Future, out_csv: str | os.PathLike[str], sink: ResultSink,
                           opts: PacsJobOptions) -> PacsSummary:
    """Predict every instance (series for 3D models) a PACS query finds with a loaded run."""
    per_series = run.pre.spec.dims == 3
    units, series_sizes = query_units(pacs, query, opts, per_series)
    book = ReportBook(sink, model_identity(run), per_series, units,
                      lambda unit: fetch_identity(pacs, unit, spool_folder(out_csv, opts.spool_dir).parent),
                      background=True)
    try:
        table = _predict_rows(run, pacs, out_csv, opts, units, series_sizes, book)
    finally:
        book.close()
    finish_outputs(table.out, run, opts.predict)
    logger.info("%d inputs: %s -> %s", sum(table.counts.values()), dict(table.counts), table.out)
    return PacsSummary(table.out, table.counts, sink.folder, sink.counts, sink.failures)


def _predict_rows(run, pacs, out_csv, opts: PacsJobOptions, units: list[Unit], series_sizes: Counter,
                  book: ReportBook) -> RowLog:
    """Retrieve, predict and write the rows of the units not done yet; hand the rows to ``book``."""
    per_series = run.pre.spec.dims == 3
    fields = classification_fields(run.label_names, opts.patient_fields, per_series)
    with RowLog(out_csv, fields, opts.resume, [u.key for u in units]) as table:
        book.add(table.previous)
        todo = [u for u in units if u.key not in table.done]
        if opts.resume:
            logger.info("resume: %d of %d inputs already done", len(units) - len(todo), len(units))
        bar, task = progress_bar(opts.progress, len(todo))
        with bar, Prefetcher(pacs, make_chunks(todo, opts.chunk_size), series_sizes,
                             spool_folder(out_csv, opts.spool_dir)) as chunks:
            for chunk in chunks:
                rows = predict_chunk(run, chunk, opts, per_series, book)
                table.write(rows)
                book.add(rows)
                bar.advance(task, len(chunk.units))
    return table
