"""Per-study (2D) or per-series (3D) DICOM SR reports, written as soon as every row of their scope
is in the table and delivered through a :class:`~medtransfer.hospital.results.ResultSink`."""
from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from medtransfer.hospital.results import ResultSink
from medtransfer.hospital.selection import Unit
from medtransfer.hospital.sr import ModelIdentity, classification_report, identity_of, write_classification_report
from medtransfer.utils.priority import lowest_cpu_priority

logger = logging.getLogger(__name__)


def report_name(unit: Unit, per_series: bool, tag: str = "") -> str:
    """``<study uid>.sr.dcm`` (``<series uid>`` for 3D models; ``.<tag>`` before the suffix when given)."""
    return f"{unit.series_uid if per_series else unit.study_uid}{'.' + tag if tag else ''}.sr.dcm"


def report_process() -> ProcessPoolExecutor:
    """One process that builds reports at the lowest CPU priority (a study's report takes tens of
    milliseconds of CPU, about 1 ms per image group): on cores the model keeps busy it takes only the
    gaps, and it never holds the job's GIL.
    Started with ``spawn``: the job's process has model and retrieval threads, which ``fork`` would copy
    in whatever state they are."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=lowest_cpu_priority)


class ReportBook:
    """Collects rows by report scope and writes each report once its scope is complete.

    ``background``: reports are built in :func:`report_process` and delivered (sent) by a writer thread
    beside the job; otherwise built and delivered in the caller's thread."""

    def __init__(self, sink: ResultSink, model: ModelIdentity, per_series: bool, units: Iterable[Unit],
                 fetch_identity: Callable[[Unit], Any], tag: str = "", background: bool = False):
        self.sink, self.model, self.per_series, self.tag = sink, model, per_series, tag
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sr-report") if background else None
        self._builder: ProcessPoolExecutor | None | bool = None  # started with the first report; False: unusable
        self._pending: list[Future] = []
        self.units = {u.key: u for u in units}
        self.expected = Counter(self._scope(u) for u in self.units.values())
        self.seen: Counter = Counter()
        self.rows: dict[str, list[tuple[Unit, Mapping[str, str]]]] = {}
        self.identities: dict[str, Any] = {}
        self.sop_classes: dict[str, str] = {}
        self.fetch_identity = fetch_identity

    def _scope(self, unit: Unit) -> str:
        return unit.series_uid if self.per_series else unit.study_uid

    def remember_identity(self, study_uid: str, header) -> None:
        """The patient / study attributes of a retrieved image of ``study_uid`` (the first one kept)."""
        if study_uid not in self.identities:
            self.identities[study_uid] = identity_of(header)

    def add(self, rows: Iterable[Mapping[str, str]]) -> None:
        """Rows of this job (or kept from an interrupted one); rows of inputs outside it are ignored."""
        for row in rows:
            unit = self.units.get(row["path"])
            if unit is None:
                continue
            scope = self._scope(unit)
            self.rows.setdefault(scope, []).append((unit, row))
            self.seen[scope] += 1
            if self.seen[scope] == self.expected[scope]:
                self._finish(scope)

    def _finish(self, scope: str) -> None:
        pairs = self.rows.pop(scope)
        ok = [(u, r) for u, r in pairs if r["status"] == "ok"]
        if not ok:
            return
        name = report_name(ok[0][0], self.per_series, self.tag)
        if self.sink.done(name):
            return
        if (self.sink.folder / name).is_file():  # written before an interruption, not sent yet
            self.sink.deliver(name)
            return
        study = ok[0][0].study_uid
        identity = self.identities.get(study)
        if identity is None:
            identity = self.fetch_identity(ok[0][0])
            if identity is None:
                self.sink.counts["report failed"] += 1
                self.sink.failures.append(f"{name}: no image of the study could be read for its identity")
                return
        sources = {u.key: [(rec.series_uid, rec.sop_class_uid or self.sop_classes.get(rec.sop_uid, ""), rec.sop_uid)
                           for rec in u.records] for u, _ in ok}
        job = (name, identity, [r for _, r in ok], sources)
        if self._pool is None:
            self._write(*job)
        else:
            self._pending.append(self._pool.submit(self._write, *job))

    def _write(self, name: str, identity, rows: list[Mapping[str, str]], sources) -> None:
        if self._pool is None or not self._built_in_process(name, identity, rows, sources):
            self.sink.deliver(name, classification_report(identity, rows, self.model, sources, self.per_series))
        else:
            self.sink.deliver(name, written=True)
        logger.info("report %s: %d prediction(s)", name, len(rows))

    def _built_in_process(self, name: str, identity, rows: list[Mapping[str, str]], sources) -> bool:
        """Build and write the report in the report process; False when that process cannot start or
        died (e.g. killed for memory): the caller then builds it here, and so do the later reports."""
        if self._builder is False:
            return False
        try:
            if self._builder is None:
                self._builder = report_process()
            self._builder.submit(write_classification_report, self.sink.folder / name, identity, rows, self.model,
                                 sources, self.per_series).result()
            return True
        except (BrokenProcessPool, OSError) as exc:
            logger.warning("the report process is not available (%s: %s); building the reports in the job's "
                           "process", type(exc).__name__, exc)
            if self._builder:
                self._builder.shutdown(wait=False, cancel_futures=True)
            self._builder = False
            return False

    def close(self) -> None:
        """Wait for the reports still being written (an error in one is raised here)."""
        if self._pool is None:
            return
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
            if self._builder:
                self._builder.shutdown(wait=True)
            self._pending.clear()


def fetch_identity(pacs, unit: Unit, spool_dir: str | os.PathLike[str] | None = None):
    """The identity of ``unit``'s study from one of its images, retrieved again (reports of studies
    whose images were predicted before a ``--resume``)."""
    import pydicom

    rec = unit.records[0]
    with tempfile.TemporaryDirectory(prefix=".medtransfer-identity-", dir=spool_dir) as tmp:
        failures = pacs.retrieve([rec], Path(tmp), {})
        path = Path(tmp) / rec.series_uid / f"{rec.sop_uid}.dcm"
        if failures or not path.is_file():
            logger.warning("cannot retrieve an image of study for its report: %s", failures.get(rec.sop_uid))
            return None
        return identity_of(pydicom.dcmread(path, stop_before_pixels=True))
