"""A PACS over DIMSE (pynetdicom): C-FIND to find (study → series → image, as every PACS answers),
C-GET on the same association or C-MOVE to our own storage SCP to retrieve, C-STORE to store.

Sockets get TCP_NODELAY: without it small DIMSE messages wait for delayed ACKs (about 11 instead
of about 100 instances/s against Orthanc on loopback).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medtransfer.errors import MedTransferError
from medtransfer.hospital.connection import (
    ConnectionSettings,
    PacsEndpoint,
    PacsError,
    not_retrievable,
    rejected,
    timed_out,
    with_retries,
)
from medtransfer.hospital.selection import InstanceRecord
from medtransfer.io.dicom import part10_header

logger = logging.getLogger(__name__)

STUDY_KEYS = {"PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyDate",
              "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID", "StudyDescription", "ModalitiesInStudy",
              "ReferringPhysicianName", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"}
SERIES_KEYS = {"Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "BodyPartExamined", "SeriesDate",
               "SeriesTime", "ProtocolName", "PerformedProcedureStepStartDate", "NumberOfSeriesRelatedInstances"}
"""Study Root attributes by level (PS3.4 C.6.2); any other search key is matched at the IMAGE level."""

PENDING = (0xFF00, 0xFF01)
MAX_CONTEXTS = 120
UIDS_PER_REQUEST = 500


def _require_pynetdicom():
    try:
        import pynetdicom
    except ImportError:
        raise MedTransferError('DIMSE needs pynetdicom: pip install "medtransfer[pacs]"') from None
    return pynetdicom


def set_nodelay(event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def hold_reactor(assoc, settle: float = 0.005, limit: float = 2.0) -> None:
    """Make sure pynetdicom's reactor thread is parked before a request is sent on ``assoc``.

    pynetdicom (3.0 and its main branch) pauses the association's reactor before each request by
    clearing a checkpoint and waiting for its ``_is_paused`` flag; the flag is set just before the
    reactor waits, so a reactor that passed the checkpoint a moment earlier can still take the
    peer's answer off the queue and drop it ("unexpected C-FIND service message"). A peer that
    answers within microseconds (TCP_NODELAY on loopback) loses a response now and then: a series
    missing from a C-FIND, a C-GET that waits for its final response. Here the checkpoint is cleared
    early and the flag must hold for ``settle`` seconds; pynetdicom then clears it again (no-op).
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc, "_is_paused"):
        return
    checkpoint.clear()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if assoc._is_paused:
            time.sleep(settle)
            if assoc._is_paused:
                return
        else:
            time.sleep(0.0005)


def new_ae(ae_title: str, settings: ConnectionSettings):
    """A pynetdicom AE with the settings' timeouts."""
    pynetdicom = _require_pynetdicom()
    ae = pynetdicom.AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout
    ae.connection_timeout = settings.timeout
    ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs
    return ae


def transfer_syntaxes() -> list[str]:
    """Transfer syntaxes we take as stored (the decoders medtransfer installs read them)."""
    from pydicom import uid

    return [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
            uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
            uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLosslessSV1, uid.ExplicitVRBigEndian]


def status_text(code: int, table: Mapping[int, tuple[str, str]]) -> str:
    category, meaning = table.get(code, ("Failure", "unknown status"))
    return f"0x{code:04X} ({category}{': ' + meaning if meaning else ''})"


def write_received(event, path: Path, fsync: bool = False) -> None:
    """Write a C-STORE request's dataset as a Part 10 file, bytes as received (atomically; with
    ``fsync`` on disk before this returns)."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    request = event.request
    header = part10_header(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                           str(event.context.transfer_syntax), PYNETDICOM_IMPLEMENTATION_UID,
                           PYNETDICOM_IMPLEMENTATION_VERSION)
    tmp = path.with_name(f".{path.name}.tmp{threading.get_ident()}")
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(request.DataSet.getvalue())
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Receiver:
    """Where incoming C-STOREs of a retrieval go: ``{sop: path}`` expected, the set received."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.expected: dict[str, Path] = {}
        self.received: set[str] = set()

    def expect(self, paths: Mapping[str, Path]) -> None:
        with self.lock:
            self.expected.update(paths)

    def handle_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self.lock:
            path = self.expected.get(uid)
        if path is None:
            logger.warning("discarding an instance the retrieval did not ask for")
            return 0x0000
        try:
            write_received(event, path)
        except OSError as exc:
            logger.warning("cannot write a retrieved instance: %s", exc)
            return 0xA700
        with self.lock:
            self.received.add(uid)
        return 0x0000

    def take(self, uids: Iterable[str]) -> set[str]:
        with self.lock:
            got = {u for u in uids if u in self.received}
            for u in uids:
                self.expected.pop(u, None)
            self.received -= got
        return got


class DimsePacs:
    """Query, retrieve and store over DIMSE. Failures become :class:`PacsError` reasons."""

    def __init__(self, endpoint: PacsEndpoint, settings: ConnectionSettings):
        _require_pynetdicom()
        self.endpoint, self.settings = endpoint, settings
        self.down: str | None = None
        self._receiver = _Receiver()
        self._scp = None

    def describe(self) -> str:
        return self.endpoint.describe()

    # -- associations ------------------------------------------------------------------------
    def _associate(self, contexts: Sequence[tuple[str, Sequence[str]]], roles: Sequence[str] = (), handlers=()):
        from pynetdicom import build_role, evt

        ae = new_ae(self.settings.calling_aet, self.settings)
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, list(syntaxes))
        where = self.endpoint.describe()
        start = time.monotonic()
        assoc = ae.associate(self.endpoint.host, self.endpoint.port, ae_title=self.endpoint.called_aet,
                             ext_neg=[build_role(r, scp_role=True) for r in roles] or None,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay), *handlers])
        if assoc.is_established:
            return assoc
        if assoc.is_rejected:
            raise rejected(f"association rejected by {where} (check the AE titles: ours "
                           f"'{self.settings.calling_aet}', theirs '{self.endpoint.called_aet}')")
        if time.monotonic() - start >= self.settings.timeout * 0.9:
            raise timed_out(f"no association with {where} within {self.settings.timeout:g} s")
        raise not_retrievable(f"cannot reach {where} (connection refused or aborted)")

    def _open(self, contexts, roles=(), handlers=(), what: str = "association"):
        """An association, retried on transient failures; a PACS that stays unreachable is marked down."""
        if self.down:
            raise PacsError(self.down)
        try:
            return with_retries(lambda: self._associate(contexts, roles, handlers), self.settings, what)
        except PacsError as exc:
            if exc.transient:
                self.down = exc.reason
            raise

    # -- C-FIND ------------------------------------------------------------------------------
    def _find(self, assoc, identifier) -> list:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel
        from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

        answers = []
        hold_reactor(assoc)
        started = time.monotonic()
        for status, ds in assoc.send_c_find(identifier, FindModel):
            if not status or "Status" not in status:
                raise PacsError(self._lost(started, "C-FIND"), transient=True)
            if status.Status in PENDING and ds is not None:
                answers.append(ds)
            elif status.Status != 0x0000:
                raise rejected(f"C-FIND status {status_text(status.Status, QR_FIND_SERVICE_CLASS_STATUS)}")
        return answers

    def query(self, fields: Sequence[str], range_keywords: Sequence[str] = ()) -> list[InstanceRecord]:
        """Every instance matching the URL's search keys: C-FIND at the STUDY, SERIES and IMAGE levels."""
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel

        keys = self.endpoint.search_keys()
        assoc = self._open([(FindModel, transfer_syntaxes()[:2])], what="C-FIND")
        try:
            records: list[InstanceRecord] = []
            for study in self._find(assoc, _identifier("STUDY", keys, STUDY_KEYS, {"StudyInstanceUID"})):
                study_uid = str(study.StudyInstanceUID)
                series_keys = {"SeriesInstanceUID", "Modality", "SeriesDescription"}
                for series in self._find(assoc, _identifier("SERIES", keys, SERIES_KEYS, series_keys,
                                                            StudyInstanceUID=study_uid)):
                    records += self._find_images(assoc, keys, study_uid, series, fields, range_keywords)
            return records
        finally:
            assoc.release()

    def _find_images(self, assoc, keys, study_uid, series, fields, range_keywords) -> list[InstanceRecord]:
        levels = STUDY_KEYS | SERIES_KEYS
        image_keys = {k: v for k, v in keys.items() if k not in levels}
        wanted = {f for f in fields if f not in levels} | set(range_keywords)
        ident = _identifier("IMAGE", image_keys, None, wanted, StudyInstanceUID=study_uid,
                            SeriesInstanceUID=str(series.SeriesInstanceUID))
        out = []
        for ds in self._find(assoc, ident):
            number = ds.get("InstanceNumber")
            out.append(InstanceRecord(
                study_uid=study_uid, series_uid=str(series.SeriesInstanceUID), sop_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.get("SOPClassUID", "") or ""), modality=str(series.get("Modality", "") or ""),
                series_description=str(series.get("SeriesDescription", "") or ""),
                instance_number=int(number) if number not in (None, "") else None,
                attributes={k: _text(ds.get(k)) if k in ds else None for k in range_keywords}))
        return out

    # -- C-GET / C-MOVE ----------------------------------------------------------------------
    def retrieve(self, records: Sequence[InstanceRecord], dest: Path,
                 series_sizes: Mapping[str, int]) -> dict[str, str]:
        """Write each instance to ``dest/<series>/<sop>.dcm``; return ``{sop: reason}`` for those that
        could not be retrieved (each series asked for with the list of its wanted SOP Instance UIDs)."""
        by_series: dict[tuple[str, str], list[InstanceRecord]] = {}
        for rec in records:
            by_series.setdefault((rec.study_uid, rec.series_uid), []).append(rec)
        failures: dict[str, str] = {}
        todo = {}
        for (study, series), recs in by_series.items():
            (dest / series).mkdir(parents=True, exist_ok=True)
            todo[(study, series)] = {r.sop_uid: dest / series / f"{r.sop_uid}.dcm" for r in recs}
        sop_classes = sorted({r.sop_class_uid for r in records if r.sop_class_uid})
        delay = self.settings.backoff
        for attempt in range(self.settings.retries + 1):
            last = self._retrieve_once(todo, sop_classes)
            for key in list(todo):
                todo[key] = {u: p for u, p in todo[key].items() if u in last}
                if not todo[key]:
                    del todo[key]
            failures = last
            if not todo or self.down or not any(_transient(r) for r in last.values()):
                break
            if attempt < self.settings.retries:
                logger.info("%d instance(s) not retrieved (%s); retrying in %.1f s", len(last),
                            next(iter(last.values())), delay)
                time.sleep(delay)
                delay *= 2
        return failures

    def _retrieve_once(self, todo: Mapping[tuple[str, str], Mapping[str, Path]], sop_classes) -> dict[str, str]:
        all_uids = [u for paths in todo.values() for u in paths]
        try:
            assoc = self._open_for_retrieval(sop_classes)
        except PacsError as exc:
            return dict.fromkeys(all_uids, exc.reason)
        failures: dict[str, str] = {}
        lost: str | None = None
        try:
            for (study, series), paths in todo.items():
                uids = list(paths)
                if not assoc.is_established:  # lost during an earlier series of this chunk
                    failures.update(dict.fromkeys(uids, lost or "not retrievable: the association was lost"))
                    continue
                self._receiver.expect(paths)
                for i in range(0, len(uids), UIDS_PER_REQUEST):
                    part = uids[i:i + UIDS_PER_REQUEST]
                    reason = self._request(assoc, study, series, part) if assoc.is_established else lost
                    lost = lost or (reason if not assoc.is_established else None)
                    got = self._receiver.take(part)
                    failures.update({u: reason or "not retrievable: the PACS did not send it" for u in part
                                     if u not in got})
        finally:
            if assoc.is_established:
                assoc.release()
        return failures

    def _open_for_retrieval(self, sop_classes: Sequence[str]):
        from pynetdicom import evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel

        if self.settings.retrieve == "move":
            self._start_scp()
            return self._open([(MoveModel, transfer_syntaxes()[:2])], what="C-MOVE")
        contexts = [(GetModel, transfer_syntaxes()[:2])]
        for sop_class in sop_classes:  # one context per transfer syntax: each is accepted with one syntax
            contexts += [(sop_class, [ts]) for ts in transfer_syntaxes()]
        if len(contexts) > MAX_CONTEXTS:
            contexts = contexts[:1] + [(c, transfer_syntaxes()[:2]) for c in sop_classes][:MAX_CONTEXTS - 1]
        return self._open(contexts, roles=sop_classes, handlers=[(evt.EVT_C_STORE, self._receiver.handle_store)],
                          what="C-GET")

    def _request(self, assoc, study: str, series: str, uids: Sequence[str]) -> str | None:
        """One C-GET / C-MOVE for ``uids`` of a series; the reason when it did not complete."""
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel
        from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS, QR_MOVE_SERVICE_CLASS_STATUS

        ident = Dataset()
        ident.QueryRetrieveLevel = "IMAGE"
        ident.StudyInstanceUID, ident.SeriesInstanceUID = study, series
        ident.SOPInstanceUID = list(uids) if len(uids) > 1 else uids[0]
        move = self.settings.retrieve == "move"
        hold_reactor(assoc)
        responses = (assoc.send_c_move(ident, self.settings.store_aet, MoveModel) if move
                     else assoc.send_c_get(ident, GetModel))
        final = None
        started = time.monotonic()
        for status, _ in responses:
            if not status or "Status" not in status:
                return self._lost(started, f"C-{'MOVE' if move else 'GET'}")
            final = status.Status
            started = time.monotonic()  # the timeout is per response
        if final in (0x0000, None):
            return None
        if move and final == 0xA801:
            return rejected(f"C-MOVE destination '{self.settings.store_aet}' is unknown to {self.describe()}; add it "
                            f"(host and port {self.settings.move_port}) to the PACS's DICOM modalities").reason
        table = QR_MOVE_SERVICE_CLASS_STATUS if move else QR_GET_SERVICE_CLASS_STATUS
        kind = "not retrievable" if final in (0xB000, 0xA701, 0xA702) else "rejected"
        return f"{kind}: C-{'MOVE' if move else 'GET'} status {status_text(final, table)}"

    def _start_scp(self) -> None:
        """Our storage SCP for C-MOVE (started once, on ``move_bind:move_port``)."""
        if self._scp is not None:
            return
        from pynetdicom import AllStoragePresentationContexts, evt

        ae = new_ae(self.settings.store_aet, self.settings)
        for ctx in AllStoragePresentationContexts:
            ae.add_supported_context(ctx.abstract_syntax, transfer_syntaxes())
        try:
            self._scp = ae.start_server((self.settings.move_bind, self.settings.move_port), block=False,
                                        evt_handlers=[(evt.EVT_C_STORE, self._receiver.handle_store),
                                                      (evt.EVT_CONN_OPEN, set_nodelay)])
        except OSError as exc:
            raise MedTransferError(f"Cannot listen on {self.settings.move_bind}:{self.settings.move_port} for "
                                   f"C-MOVE ({exc.strerror}); choose another port with --pacs-set move_port=N "
                                   "(and tell the PACS).") from None

    # -- C-STORE -----------------------------------------------------------------------------
    def store(self, paths: Sequence[Path]) -> dict[str, str]:
        """C-STORE the files; return ``{sop: reason}`` for the instances the PACS did not accept."""
        import pydicom
        from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
        uids = [str(h.SOPInstanceUID) for h in headers]
        contexts: dict[str, set[str]] = {}
        for h in headers:
            contexts.setdefault(str(h.SOPClassUID), set()).add(str(h.file_meta.TransferSyntaxUID))
        try:
            assoc = self._open([(c, sorted(ts)) for c, ts in contexts.items()], what="C-STORE")
        except PacsError as exc:
            return dict.fromkeys(uids, exc.reason)
        failures: dict[str, str] = {}
        try:
            for path, uid in zip(paths, uids):
                if not assoc.is_established:
                    failures[uid] = f"not stored: the association with {self.describe()} was lost"
                    continue
                hold_reactor(assoc)
                started = time.monotonic()
                status = assoc.send_c_store(str(path))
                if not status or "Status" not in status:
                    failures[uid] = self._lost(started, "C-STORE")
                elif status.Status != 0x0000 and not 0xB000 <= status.Status <= 0xB0FF:
                    failures[uid] = f"rejected: C-STORE status {status_text(status.Status, STORAGE_SERVICE_CLASS_STATUS)}"
        finally:
            if assoc.is_established:
                assoc.release()
        return failures

    def _lost(self, started: float, what: str) -> str:
        """The reason for a request that got no answer: a timeout, or a PACS that went away."""
        if time.monotonic() - started >= self.settings.timeout * 0.9:
            return timed_out(f"{what}: no answer from {self.describe()} within {self.settings.timeout:g} s").reason
        return not_retrievable(f"{what}: the association with {self.describe()} was lost").reason

    def close(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None


def _transient(reason: str) -> bool:
    return reason.startswith(("timed out", "not retrievable"))


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _identifier(level: str, keys: Mapping[str, str], level_keys: set[str] | None, wanted: Iterable[str],
                **fixed: str):
    """A C-FIND identifier: the search keys of this level, the attributes to return (empty), fixed UIDs."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in wanted:
        setattr(ds, keyword, "")
    for keyword, value in keys.items():
        if level_keys is None or keyword in level_keys:
            setattr(ds, keyword, value)
    for keyword, value in fixed.items():
        setattr(ds, keyword, value)
    return ds
