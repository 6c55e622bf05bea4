"""``medtransfer serve``: a DICOM storage SCP that predicts what it receives and sends the results on.

Modalities or PACS routing rules send studies by C-STORE (concurrent associations). Each instance
is written to ``STATE_DIR/incoming`` and journaled (:mod:`medtransfer.hospital.journal`) before
the C-STORE is answered. A study that has received nothing for the quiet period becomes a batch:
its instances go through the same code as a PACS job (:func:`~medtransfer.hospital.pipeline.predict_chunk`
or :func:`~medtransfer.hospital.segjob.segment_chunk`), its rows are written to
``STATE_DIR/rows/<batch>.csv`` and its SR / SEG to ``STATE_DIR/results`` and the destination.
Delivery that fails is retried; a restart takes up every unfinished batch where it stopped; an
instance is predicted once. SIGTERM stops accepting associations, finishes the batch in hand and
exits.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from medtransfer.errors import MedTransferError
from medtransfer.hospital.connection import ConnectionSettings, parse_pacs_url
from medtransfer.hospital.journal import Batch, JournaledInstance, Journal
from medtransfer.hospital.pacs import open_pacs
from medtransfer.hospital.pipeline import PacsJobOptions, note_sources, predict_chunk
from medtransfer.hospital.reports import ReportBook
from medtransfer.hospital.results import ResultSink
from medtransfer.hospital.rows import classification_fields, segmentation_fields
from medtransfer.hospital.selection import InstanceRecord, plan_units
from medtransfer.hospital.spool import Chunk

logger = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    """Where and how the listener listens, batches and delivers."""

    state_dir: Path = Path("medtransfer-serve")
    port: int = 11112
    ae_title: str = "MEDTRANSFER"
    bind: str = "0.0.0.0"
    quiet_period: float = 10.0
    """Seconds without a new instance of a study before it is predicted."""
    send_to: str | None = None
    results_dir: Path | None = None
    allow_aets: tuple[str, ...] = ()
    """Calling AE titles allowed to store (empty: any)."""
    max_associations: int = 10
    keep_images: bool = False
    retry_after: float = 30.0
    """Seconds before delivery of a batch's results is tried again."""
    poll: float = 0.5
    job: PacsJobOptions = field(default_factory=PacsJobOptions)


class Listener:
    """The storage SCP, the journal and the batch worker of ``medtransfer serve``."""

    def __init__(self, run_dir: str | os.PathLike[str], options: ServeOptions,
                 settings: ConnectionSettings | None = None, device: str = "auto"):
        from medtransfer.run import is_segmentation_run

        self.run_dir, self.opts = Path(run_dir), options
        self.settings = settings or ConnectionSettings()
        self.state = Path(options.state_dir)
        for sub in ("incoming", "work", "rows"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.state / "journal.sqlite")
        destination = open_pacs(parse_pacs_url(options.send_to), self.settings) if options.send_to else None
        self.sink = ResultSink(options.results_dir or self.state / "results", destination)
        self.segmentation = is_segmentation_run(self.run_dir)
        self.run = None if self.segmentation else _load(self.run_dir, device)
        self.server = None
        self._drop_orphans()

    # -- receiving ---------------------------------------------------------------------------
    def _drop_orphans(self) -> None:
        """Files of C-STOREs that were never answered (the sender stores them again)."""
        known = self.journal.known_paths()
        for path in (self.state / "incoming").rglob("*"):
            if path.is_file() and str(path) not in known:
                path.unlink()

    def handle_store(self, event) -> int:
        """EVT_C_STORE: write, fsync, journal, then answer (0x0000, or 0xA700 when it cannot be kept)."""
        from medtransfer.hospital.dimse import write_received

        try:
            ds = event.dataset
            inst = JournaledInstance(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                     str(event.request.AffectedSOPClassUID), "")
        except (AttributeError, KeyError, ValueError) as exc:
            logger.warning("C-STORE without usable UIDs refused: %s", type(exc).__name__)
            return 0xC000
        folder = self.state / "incoming" / inst.study_uid / inst.series_uid
        path = folder / f"{inst.sop_uid}.dcm"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_received(event, path, fsync=True)
        except OSError as exc:
            logger.warning("cannot keep a received instance: %s", exc.strerror)
            return 0xA700
        if not self.journal.record(replace(inst, path=str(path)), calling_aet=str(event.assoc.requestor.ae_title)):
            logger.info("instance received again after it was predicted: acknowledged, not predicted twice")
        return 0x0000

    def start(self) -> None:
        """Listen for associations (non-blocking)."""
        from pynetdicom import AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        from medtransfer.hospital.dimse import new_ae, set_nodelay, transfer_syntaxes

        ae = new_ae(self.opts.ae_title, self.settings)
        ae.maximum_associations = self.opts.max_associations
        ae.require_calling_aet = list(self.opts.allow_aets)
        ae.add_supported_context(Verification)
        for ctx in AllStoragePresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax, transfer_syntaxes())
        try:
            self.server = ae.start_server((self.opts.bind, self.opts.port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, self.handle_store),
                                                        (evt.EVT_CONN_OPEN, set_nodelay)])
        except OSError as exc:
            raise MedTransferError(f"Cannot listen on {self.opts.bind}:{self.opts.port} ({exc.strerror}); "
                                   "choose another --dimse-port or stop what uses it.") from None
        logger.info("listening as %s on %s:%d; quiet period %g s; results -> %s%s", self.opts.ae_title,
                    self.opts.bind, self.opts.port, self.opts.quiet_period, self.sink.folder,
                    f" and {self.sink.target}" if self.sink.target else "")

    # -- batches -----------------------------------------------------------------------------
    def process_due(self, now: float | None = None) -> int:
        """Take up unfinished batches (delivery retried after ``retry_after``) and open the due ones."""
        now = time.time() if now is None else now
        done = 0
        for batch in self.journal.unfinished():
            if batch.attempts and now - batch.updated_at < self.opts.retry_after:
                continue
            done += self._work_safely(batch)
        for study in self.journal.due_studies(self.opts.quiet_period, now):
            batch = self.journal.open_batch(study, now)
            if batch is not None:
                done += self._work_safely(batch)
        return done

    def _work_safely(self, batch: Batch) -> int:
        """:meth:`work`; an unexpected failure leaves the batch in its state, to be tried again later."""
        try:
            self.work(batch)
            return 1
        except Exception as exc:  # noqa: BLE001 - the listener must keep serving; the journal keeps the batch
            logger.exception("batch %d failed (%s); tried again in %g s", batch.id, type(exc).__name__,
                             self.opts.retry_after)
            self.journal.set_state(batch.id, batch.state, note=f"{type(exc).__name__}: {exc}", attempt=True)
            return 0

    def _chunk(self, batch: Batch) -> Chunk:
        """The batch as a chunk: its files linked into ``work/<batch>/<series>/<sop>.dcm``."""
        instances = self.journal.instances(batch.id)
        records = [InstanceRecord(i.study_uid, i.series_uid, i.sop_uid, i.sop_class_uid) for i in instances]
        folder = self.state / "work" / f"{batch.id:08d}"
        per_series = self.segmentation or self.run.pre.spec.dims == 3
        chunk = Chunk(batch.id, plan_units(records, per_series, self.opts.job.selection), folder)
        for inst in instances:
            target = folder / inst.series_uid / f"{inst.sop_uid}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                continue
            try:
                os.link(inst.path, target)
            except FileNotFoundError:
                chunk.failures[inst.sop_uid] = "not retrievable: the received file is gone"
            except OSError:
                shutil.copyfile(inst.path, target)
        return chunk

    def work(self, batch: Batch) -> None:
        """Predict (unless done before a restart), deliver, and clean up one batch."""
        chunk = self._chunk(batch)
        rows_csv = self.state / "rows" / f"{batch.id:08d}.csv"
        failures_before = len(self.sink.failures)
        book = None if self.segmentation else self._book(chunk)
        if batch.state == "pending":
            rows = self._predict(chunk, book)
            _write_rows(rows_csv, rows, self._fields())
            self.journal.set_state(batch.id, "predicted")
        else:
            rows = _read_rows(rows_csv)
        self._deliver(chunk, rows, book)
        new_failures = self.sink.failures[failures_before:]
        if new_failures:
            self.journal.set_state(batch.id, "predicted", note=new_failures[0], attempt=True)
            logger.warning("batch %d: %d result(s) not delivered; retry in %g s", batch.id, len(new_failures),
                           self.opts.retry_after)
            return
        self.journal.set_state(batch.id, "delivered")
        shutil.rmtree(chunk.folder, ignore_errors=True)
        if not self.opts.keep_images:
            for inst in self.journal.instances(batch.id):
                Path(inst.path).unlink(missing_ok=True)
        logger.info("batch %d (%d rows) delivered", batch.id, len(rows))

    def _fields(self) -> list[str]:
        if self.segmentation:
            from medtransfer.segmentation.inference import load_run

            return segmentation_fields(load_run(self.run_dir)[1]["label_names"])
        per_series = self.run.pre.spec.dims == 3
        return classification_fields(self.run.label_names, self.opts.job.patient_fields, per_series)

    def _predict(self, chunk: Chunk, book: ReportBook | None) -> list[dict]:
        """Rows of a batch (SEG objects are delivered on the way; reports by :meth:`_deliver`)."""
        if self.segmentation:
            from medtransfer.hospital.segjob import segment_chunk
            from medtransfer.hospital.sr import file_sha256

            return segment_chunk(self.run_dir, chunk, self.opts.job, self.sink, file_sha256(self.run_dir / "model.pt"))
        return predict_chunk(self.run, chunk, self.opts.job, self.run.pre.spec.dims == 3, book)

    def _book(self, chunk: Chunk) -> ReportBook:
        from medtransfer.hospital.sr import model_identity

        return ReportBook(self.sink, model_identity(self.run), self.run.pre.spec.dims == 3, chunk.units,
                          fetch_identity=lambda unit: None, tag=f"batch{chunk.index}")

    def _deliver(self, chunk: Chunk, rows: list[dict], book: ReportBook | None) -> None:
        """The results of a batch's rows (again after a restart or a failed delivery: nothing twice)."""
        if book is None:  # segmentation: SEG objects written while predicting; send what is not sent
            for row in rows:
                if row.get("seg_sop_instance_uid"):
                    self.sink.deliver(f"{row['series_instance_uid']}.seg.dcm")
            return
        for unit in chunk.units:
            if unit.study_uid not in book.identities and all(chunk.path_of(r).is_file() for r in unit.records):
                note_sources(book, chunk, unit)
        book.add(rows)

    def serve_forever(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set; then stop listening (the batch in hand is finished)."""
        self.start()
        try:
            while not stop.is_set():
                self.process_due()
                stop.wait(self.opts.poll)
        finally:
            self.shutdown()

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting; give associations in progress ``grace`` seconds to finish, then abort them
        (a C-STORE not answered is sent again by its sender); close the journal."""
        if self.server is not None:
            self.server.shutdown()
            deadline = time.monotonic() + grace
            while any(a.is_established for a in self.server.active_associations) and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self.server.active_associations:  # idle connections, e.g. health checks
                assoc.abort()
            self.server = None
        if self.sink.destination is not None:
            self.sink.destination.close()
        self.journal.close()
        logger.info("stopped; journal: %s", self.state / "journal.sqlite")


def _load(run_dir: Path, device: str):
    from medtransfer.inference import load_run

    return load_run(run_dir, device)


def _write_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    from medtransfer.utils.atomic import write_csv_atomic

    write_csv_atomic(path, [{k: r.get(k, "") for k in fields} for r in rows], fields)


def _read_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
