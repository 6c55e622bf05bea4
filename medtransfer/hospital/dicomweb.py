"""A PACS over DICOMweb (dicomweb-client): QIDO-RS to find, WADO-RS to retrieve, STOW-RS to store.

Retrieved instances are written as received (``transfer-syntax=*``: no transcoding), one file per
instance, as they stream in; a whole series comes in one multipart request, and its parts (Part 10
files) go to disk byte for byte: only the SOP Instance UID is read from each, instead of decoding every
instance into a dataset and encoding it again.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from medtransfer.hospital.connection import (
    ConnectionSettings,
    PacsEndpoint,
    PacsError,
    not_retrievable,
    rejected,
    timed_out,
)
from medtransfer.hospital.selection import InstanceRecord
from medtransfer.io.dicom import part10_instance_uid
from medtransfer.utils.atomic import atomic_path, write_bytes_atomic

logger = logging.getLogger(__name__)

AS_STORED = (("application/dicom", "*"),)
"""WADO-RS media type asking for each instance in the transfer syntax it is stored in."""


def _require_client():
    try:
        import dicomweb_client
        import requests
    except ImportError:
        from medtransfer.errors import MedTransferError

        raise MedTransferError('DICOMweb needs dicomweb-client: pip install "medtransfer[pacs]"') from None
    return dicomweb_client, requests


def http_session(settings: ConnectionSettings):
    """A requests session carrying the authentication and TLS settings (secrets read here, never logged).

    The CA bundle (``ca_cert``) or ``verify_tls: false`` holds for every request: requests would
    otherwise let ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` from the environment replace it.
    """
    _, requests = _require_client()
    verify = settings.ca_cert or settings.verify_tls

    class Session(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify_arg, cert):
            merged = super().merge_environment_settings(url, proxies, stream, verify_arg, cert)
            if settings.ca_cert or not settings.verify_tls:
                merged["verify"] = verify
            return merged

    session = Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=_retry_policy(settings))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    token = settings.secret("token")
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif settings.username:
        session.auth = (settings.username, settings.secret("password"))
    session.verify = verify
    if settings.client_cert:
        session.cert = (settings.client_cert, settings.client_key) if settings.client_key else settings.client_cert
    return session


def _retry_policy(settings: ConnectionSettings):
    """urllib3 retries: refused / reset connections, read timeouts and 429 / 5xx answers, ``retries``
    times with ``backoff`` seconds doubled each time; a TLS or authentication failure is not retried."""
    from urllib3.util.retry import Retry

    return Retry(total=settings.retries, connect=settings.retries, read=settings.retries,
                 status=settings.retries, other=0, backoff_factor=settings.backoff,
                 status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None, raise_on_status=False,
                 respect_retry_after_header=True)


def _tag(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    return f"{tag_for_keyword(keyword):08X}"


def _json_value(item: Mapping[str, Any], keyword: str) -> str | None:
    """The attribute's value in a DICOM JSON object as text (multi-values joined by ``\\``);
    ``None`` when the attribute is absent."""
    element = item.get(_tag(keyword))
    if element is None:
        return None
    values = element.get("Value") or []
    return "\\".join(str(v.get("Alphabetic", "") if isinstance(v, dict) else v) for v in values)


def record_from_json(item: Mapping[str, Any], range_keywords: Sequence[str]) -> InstanceRecord:
    """An :class:`InstanceRecord` from one QIDO-RS answer."""
    number = _json_value(item, "InstanceNumber")
    return InstanceRecord(
        study_uid=_json_value(item, "StudyInstanceUID") or "", series_uid=_json_value(item, "SeriesInstanceUID") or "",
        sop_uid=_json_value(item, "SOPInstanceUID") or "", sop_class_uid=_json_value(item, "SOPClassUID") or "",
        modality=_json_value(item, "Modality") or "", series_description=_json_value(item, "SeriesDescription") or "",
        instance_number=int(float(number)) if number else None,
        attributes={k: _json_value(item, k) for k in range_keywords},
    )


class DicomWebPacs:
    """Query, retrieve and store over DICOMweb. Failures become :class:`PacsError` reasons."""

    def __init__(self, endpoint: PacsEndpoint, settings: ConnectionSettings):
        dicomweb_client, _ = _require_client()
        self.endpoint, self.settings = endpoint, settings
        self.session = http_session(settings)
        self.client = dicomweb_client.DICOMwebClient(
            url=endpoint.base_url, session=self.session, timeout=(settings.timeout, settings.timeout))
        self.client.set_http_retry_params(retry=False)  # the session's urllib3 policy retries (by kind of failure)
        self.down: str | None = None
        """Set once the PACS could not be reached or stopped answering (after the retries): later
        requests fail at once with this reason instead of each waiting for its timeout."""

    def describe(self) -> str:
        return self.endpoint.describe()

    def _failure(self, exc: Exception, what: str) -> PacsError:
        _, requests = _require_client()
        where = self.endpoint.describe()
        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            code = exc.response.status_code
            if code in (401, 403):
                return rejected(f"{what}: HTTP {code} from {where} (check the username / password or token)")
            if code == 404:
                return not_retrievable(f"{what}: HTTP 404, not found on {where}", transient=False)
            if code in (400, 406, 409, 415):
                return rejected(f"{what}: HTTP {code} {exc.response.reason} from {where}")
            return not_retrievable(f"{what}: HTTP {code} {exc.response.reason} from {where}")
        text = str(exc)
        if isinstance(exc, requests.exceptions.Timeout) or "timed out" in text.lower():
            error = timed_out(f"{what}: no answer from {where} within {self.settings.timeout:g} s")
            self.down = error.reason  # retried already: a PACS that hangs is not asked again in this job
            return error
        if isinstance(exc, requests.exceptions.SSLError):
            return rejected(f"{what}: TLS handshake with {where} failed ({type(exc).__name__}); check ca_cert / "
                            "client_cert")
        if isinstance(exc, requests.exceptions.ConnectionError):
            error = not_retrievable(f"{what}: cannot reach {where} (connection refused or closed)")
            self.down = error.reason
            return error
        return not_retrievable(f"{what}: {type(exc).__name__} from {where}")

    def query(self, fields: Sequence[str], range_keywords: Sequence[str] = ()) -> list[InstanceRecord]:
        """Every instance matching the URL's search keys (QIDO-RS, all pages)."""
        _, requests = _require_client()
        try:
            answers = self.client.search_for_instances(search_filters=self.endpoint.search_keys(), fields=list(fields),
                                                       get_remaining=True)
        except requests.exceptions.RequestException as exc:
            raise self._failure(exc, "QIDO-RS search") from None
        return [record_from_json(a, range_keywords) for a in answers]

    def retrieve(self, records: Sequence[InstanceRecord], dest: Path,
                 series_sizes: Mapping[str, int]) -> dict[str, str]:
        """Write each instance to ``dest/<series>/<sop>.dcm``; return ``{sop: reason}`` for those that
        could not be retrieved. A series asked for whole comes in one WADO-RS request."""
        by_series: dict[str, list[InstanceRecord]] = {}
        for rec in records:
            by_series.setdefault(rec.series_uid, []).append(rec)
        failures: dict[str, str] = {}
        for series_uid, recs in by_series.items():
            folder = dest / series_uid
            folder.mkdir(parents=True, exist_ok=True)
            if self.down:
                failures.update({r.sop_uid: self.down for r in recs})
                continue
            if len(recs) > 1 and len(recs) == series_sizes.get(series_uid):
                failures.update(self._retrieve_series(recs, folder))
            else:
                failures.update(self._retrieve_instances(recs, folder))
        return failures

    def _retrieve_series(self, recs: Sequence[InstanceRecord], folder: Path) -> dict[str, str]:
        _, requests = _require_client()
        wanted = {r.sop_uid for r in recs}
        got: set[str] = set()
        try:
            for part in self._series_parts(recs[0].study_uid, recs[0].series_uid):
                uid = _save_part(part, folder, wanted)
                if uid is not None:
                    got.add(uid)
        except requests.exceptions.RequestException as exc:
            failure = self._failure(exc, "WADO-RS series")
            if self.down:
                return {uid: failure.reason for uid in wanted - got}
            logger.info("series stream broke (%s); retrieving the rest one by one", failure.reason)
        missing = [r for r in recs if r.sop_uid not in got]
        return self._retrieve_instances(missing, folder) if missing else {}

    def _series_parts(self, study_uid: str, series_uid: str):
        """The instances of a series as they arrive: raw multipart bodies (bytes) where this
        dicomweb-client exposes them, else its decoded datasets."""
        names = ("_http_get", "_decode_multipart_message", "_get_series_url")
        get, decode, url_of = (getattr(self.client, name, None) for name in names)
        if get is None or decode is None or url_of is None:
            return self.client.iter_series(study_uid, series_uid, media_types=AS_STORED)
        from dicomweb_client.web import _Transaction

        response = get(url_of(_Transaction.RETRIEVE, study_uid, series_uid), stream=True,
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        if response.headers.get("Content-Type", "").startswith("application/dicom"):  # one part, not encapsulated
            return iter([response.content])
        return decode(response, stream=True)

    def _retrieve_instances(self, recs: Sequence[InstanceRecord], folder: Path) -> dict[str, str]:
        _, requests = _require_client()
        failures: dict[str, str] = {}
        for rec in recs:
            if self.down:
                failures[rec.sop_uid] = self.down
                continue
            try:
                ds = self.client.retrieve_instance(rec.study_uid, rec.series_uid, rec.sop_uid, media_types=AS_STORED)
                _save(ds, folder / f"{rec.sop_uid}.dcm")
            except requests.exceptions.RequestException as exc:
                failures[rec.sop_uid] = self._failure(exc, "WADO-RS instance").reason
        return failures

    def store(self, paths: Sequence[Path]) -> dict[str, str]:
        """STOW-RS the files; return ``{sop: reason}`` for the instances the PACS did not accept."""
        import pydicom

        _, requests = _require_client()
        datasets = [pydicom.dcmread(p) for p in paths]
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        try:
            response = self.client.store_instances(datasets)
        except requests.exceptions.RequestException as exc:
            reason = self._failure(exc, "STOW-RS").reason
            return dict.fromkeys(uids, reason)
        failed = {}
        for item in (response.get("FailedSOPSequence") or []) if response is not None else []:
            code = int(item.get("FailureReason", 0xC000))
            failed[str(item.ReferencedSOPInstanceUID)] = f"rejected: STOW-RS failure reason 0x{code:04X}"
        return failed

    def close(self) -> None:
        self.session.close()


def _save_part(part, folder: Path, wanted: set[str]) -> str | None:
    """Write one part of a series response as ``folder/<sop uid>.dcm`` when its instance is wanted;
    returns its SOP Instance UID (None: not wanted). A Part 10 body is written as received, named by its
    file meta's Media Storage SOP Instance UID (the header is parsed only when that is not one we want);
    anything else (a dataset, or a body without the Part 10 preamble) is decoded and written as Part 10."""
    import pydicom

    if not isinstance(part, (bytes, bytearray)):
        uid = str(part.SOPInstanceUID)
        if uid in wanted:
            _save(part, folder / f"{uid}.dcm")
        return uid if uid in wanted else None
    if part[128:132] != b"DICM":
        return _save_part(_with_file_meta(pydicom.dcmread(BytesIO(part), force=True)), folder, wanted)
    uid = part10_instance_uid(part)
    if uid not in wanted:  # not in the file meta, or not wanted: the dataset's own UID decides
        header = pydicom.dcmread(BytesIO(part), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = str(header.SOPInstanceUID)
        if uid not in wanted:
            return None
    write_bytes_atomic(folder / f"{uid}.dcm", part)
    return uid


def _with_file_meta(ds):
    """A dataset read from a body without Part 10 header, given the file meta that makes it one."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit = ds.original_encoding[0] if hasattr(ds, "original_encoding") else ds.is_implicit_VR
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta.get("MediaStorageSOPInstanceUID") or ds.SOPInstanceUID
    ds.file_meta = meta
    return ds


def _save(ds, path: Path) -> None:
    """Write a retrieved dataset (Part 10, as received) atomically."""
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
