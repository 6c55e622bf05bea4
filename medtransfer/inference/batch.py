"""Streaming batch inference over DICOM folders of any size.

* Every input is accounted for: one row per file for 2D models; one row per series for 3D models
  (its files listed), plus one row for each file that belongs to no usable series. Broken DICOM is an
  ``error``; files that are not DICOM, hidden files and objects without an image are ``skipped``;
  hidden folders are not entered.
* Decoding runs in ``workers`` processes (a torch ``DataLoader``, lowest CPU priority) and overlaps
  with batched model compute; only the file list and one batch of tensors are in memory at a time.
* Rows are appended to ``<out>.partial`` and flushed batch by batch; the finished file is moved
  into place atomically. ``resume=True`` keeps the rows already written (by a finished or an
  interrupted run) and processes only the rest.
* ``shard=(i, n)`` takes the i-th of n contiguous blocks of the sorted work list, so n machines
  can run in parallel and their outputs, concatenated in shard order, equal the full run.
* ``study_json_dir``: besides the table, one JSON file per StudyInstanceUID (its rows, status
  counts and a study-level summary), written atomically once the table is complete.
* Patient-identifying fields (PatientID, PatientName, PatientBirthDate) are never written unless
  ``patient_fields=True``.

The job is four stages that every engine shares (:mod:`medtransfer.inference.ray_engine` runs
them on a Ray cluster): :func:`work_items` lists the inputs, :func:`decode_item` turns one into a
tensor or a status, :class:`ModelStep` runs the model on a batch of decoded items,
:class:`RowBuilder` makes the rows and :class:`PredictionTable` writes them.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medtransfer.data.preprocess import UnsupportedImageError, require_finite
from medtransfer.errors import MedTransferError, UsageError
from medtransfer.io import (
    MedIOError,
    NoPixelDataError,
    NotDicomError,
    is_nifti_path,
    is_raster_path,
    read_dicom_header,
)
from medtransfer.utils.atomic import DiskFullError
from medtransfer.utils.priority import lowest_cpu_priority

logger = logging.getLogger(__name__)

BASE_FIELDS = ["path", "status", "reason", "sop_instance_uid", "study_instance_uid", "series_instance_uid"]
PATIENT_FIELDS = ["patient_id", "patient_name", "patient_birth_date"]
STUDY_JSON_FORMAT = "medtransfer-study/1"


@dataclass
class SeriesFilter:
    """Which images a job takes: modality codes, a SeriesDescription regex, a minimum slice count."""

    modalities: tuple[str, ...] = ()
    description: str | None = None
    min_slices: int = 1

    def reason_to_skip(self, modality: str, description: str, n_slices: int | None = None) -> str | None:
        if self.modalities and modality not in self.modalities:
            return f"modality {modality or 'unknown'} not selected ({', '.join(self.modalities)})"
        if self.description and not re.search(self.description, description or "", re.IGNORECASE):
            return f"series description {description!r} does not match {self.description!r}"
        if n_slices is not None and n_slices < self.min_slices:
            return f"{n_slices} slice(s), fewer than the minimum {self.min_slices}"
        return None


@dataclass
class WorkItem:
    """One unit of work: a file (2D) or a series (3D). ``status`` is set when it needs no model."""

    key: str
    paths: list[str]
    status: str = ""
    reason: str = ""
    ids: dict[str, str] = field(default_factory=dict)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/4"`` → ``(1, 4)`` (0-based index ``i`` of ``n`` shards)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise MedTransferError(f"--shard '{text}' must be i/n with 0 <= i < n, e.g. 0/4 … 3/4.")
    return int(m.group(1)), int(m.group(2))


def shard_slice(items: list[Any], shard: tuple[int, int] | None) -> list[Any]:
    """The ``i``-th of ``n`` contiguous blocks (sizes differ by at most one)."""
    if shard is None:
        return items
    i, n = shard
    return items[len(items) * i // n: len(items) * (i + 1) // n]


def _ids(meta: dict[str, Any]) -> dict[str, str]:
    return {
        "sop_instance_uid": str(meta.get("sop_instance_uid") or ""),
        "study_instance_uid": str(meta.get("study_instance_uid") or ""),
        "series_instance_uid": str(meta.get("series_instance_uid") or ""),
    }


_ID_TAGS = {"sop_instance_uid": "SOPInstanceUID", "study_instance_uid": "StudyInstanceUID",
            "series_instance_uid": "SeriesInstanceUID"}
_PATIENT_TAGS = {"patient_id": "PatientID", "patient_name": "PatientName", "patient_birth_date": "PatientBirthDate"}


def _header_fields(path: str, tags: dict[str, str]) -> dict[str, str]:
    """``{column: str(value of the DICOM keyword)}`` from a file's header; ``{}`` when unreadable."""
    try:
        ds = read_dicom_header(path)
    except Exception:
        return {}
    return {col: str(ds.get(keyword, "") or "") for col, keyword in tags.items()}


def _header_ids(path: str) -> dict[str, str]:
    return _header_fields(path, _ID_TAGS)


def _patient_ids(path: str) -> dict[str, str]:
    """PatientID, PatientName and PatientBirthDate of a file (only when the user asked for them)."""
    return _header_fields(path, _PATIENT_TAGS)


@dataclass
class DecodedItem:
    """A work item after decoding: the model input (``None`` when the item needs no model) and the
    row's status, reason and DICOM identifiers. ``index`` is the item's position in the work list."""

    index: int
    tensor: torch.Tensor | None
    status: str
    reason: str
    ids: dict[str, str]


def decode_item(item: WorkItem, pre, dims: int, filt: SeriesFilter, patient_fields: bool = False,
                index: int = 0) -> DecodedItem:
    """Read and preprocess one work item with the run's preprocessor; never raises: an unreadable
    input becomes an ``error``, one the model does not take a ``skipped`` item, with the reason."""
    decoded = _decode(item, pre, dims, filt, index)
    if patient_fields:
        decoded.ids.update(_patient_ids(item.paths[0]))
    return decoded


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
"""File names that promise DICOM: such a file that is not DICOM is an error, not a README to skip."""


def not_dicom_status(path: str, reason: str) -> tuple[str, str]:
    """A file that is not DICOM is ``skipped`` (a README on a patient CD), unless its name says DICOM."""
    if str(path).lower().endswith(DICOM_SUFFIXES):
        return "error", f"not DICOM despite its name ({reason})"
    return "skipped", reason


def _decode(item: WorkItem, pre, dims: int, filt: SeriesFilter, index: int) -> DecodedItem:
    out = DecodedItem(index, None, item.status, item.reason, dict(item.ids))
    if item.status:
        return out
    try:
        _load(item, pre, dims, filt, out)
        if out.tensor is not None:
            require_finite(out.tensor, item.key)
    except NotDicomError as exc:
        out.status, out.reason = not_dicom_status(item.paths[0], exc.reason)
        out.tensor, out.ids = None, _header_ids(item.paths[0])
    except (NoPixelDataError, UnsupportedImageError) as exc:
        out.status, out.reason, out.tensor, out.ids = "skipped", exc.reason, None, _header_ids(item.paths[0])
    except MedIOError as exc:
        out.status, out.reason, out.tensor = "error", exc.reason, None
        out.ids = out.ids or _header_ids(item.paths[0])
    except Exception as exc:  # one bad input never stops the batch
        out.status, out.reason, out.tensor = "error", f"{type(exc).__name__}: {exc}", None
        out.ids = _header_ids(item.paths[0])
    return out


def _load(item: WorkItem, pre, dims: int, filt: SeriesFilter, out: DecodedItem) -> None:
    """Fill ``out`` with the item's tensor (or its ``skipped`` status when the selection leaves it out)."""
    if _image_file(item.paths[0]):  # NIfTI / PNG: no DICOM header, so no UIDs and no selection by tags
        skip = filt.reason_to_skip("", "")
        if skip:
            out.status, out.reason = "skipped", skip
            return
        load = pre.load_volume if dims == 3 else pre.load_image
        out.tensor, out.status = load(item.paths[0]), "ok"
        return
    if dims == 3:
        tensor, ids = pre.load_series(item.paths)
    else:
        tensor, meta = pre.load_dicom_with_meta(item.paths[0])
        ids = _ids(meta)
        skip = filt.reason_to_skip(meta.get("modality", ""), meta.get("series_description", ""))
        if skip:
            out.status, out.reason, out.ids = "skipped", skip, ids
            return
    out.tensor, out.status, out.ids = tensor, "ok", ids


class _Decode(Dataset):
    """The work list as a Dataset, decoded in DataLoader workers by :func:`decode_item`."""

    def __init__(self, items: list[WorkItem], pre, dims: int, filt: SeriesFilter, patient_fields: bool = False):
        self.items, self.pre, self.dims, self.filt = items, pre, dims, filt
        self.patient_fields = patient_fields

    def __getitem__(self, i: int) -> DecodedItem:
        return decode_item(self.items[i], self.pre, self.dims, self.filt, self.patient_fields, index=i)

    def __len__(self) -> int:
        return len(self.items)


class ModelStep:
    """The model on a batch of decoded items: stack the tensors, normalise, forward, probabilities.

    The first batch with an input is checked against the weights' input contract (once per instance,
    so once per job locally and once per model actor under Ray).
    """

    def __init__(self, run):
        self.run = run
        self._checked = False
        self.last_input: torch.Tensor | None = None
        """The normalised input of the latest batch (for hooks such as saliency maps); None if it had none."""

    def probabilities(self, batch: list[DecodedItem]) -> list[Any]:
        """One probability row (a numpy array) per item that has a tensor, ``None`` for the others."""
        from medtransfer.backbones import check_input_contract

        run = self.run
        ready = [b for b in batch if b.tensor is not None]
        self.last_input = None
        if not ready:
            return [None] * len(batch)
        pin = run.device.type == "cuda"
        x = torch.stack([b.tensor for b in ready])
        if pin:
            x = x.pin_memory()
        x = run.pre.normalize(x.to(run.device, non_blocking=pin))
        if not self._checked:  # a real batch against the weights' contract
            check_input_contract(x, run.checkpoint["backbone"], channels=run.pre.spec.channels,
                                 dims=run.pre.spec.tensor_dims)
            self._checked = True
        self.last_input = x
        with torch.no_grad(), torch.autocast(run.device.type, enabled=run.device.type == "cuda"):
            logits = run.model(x)
        probs = iter(run.model.probabilities(logits).cpu().numpy())
        return [next(probs) if b.tensor is not None else None for b in batch]


def output_fields(label_names: list[str], dims: int, patient_fields: bool = False) -> list[str]:
    """The columns of the prediction table, in order."""
    return (BASE_FIELDS + (PATIENT_FIELDS if patient_fields else []) + (["files"] if dims == 3 else [])
            + [f"prob_{n}" for n in label_names] + ["predicted"])


class RowBuilder:
    """Turns a decoded item and its probabilities into one output row (all values as written)."""

    def __init__(self, run, patient_fields: bool = False):
        self.dims = run.pre.spec.dims
        self.prob_cols = [f"prob_{n}" for n in run.label_names]
        self.fields = output_fields(run.label_names, self.dims, patient_fields)
        self._predicted_label = run.predicted_label

    def row(self, item: WorkItem, decoded: DecodedItem, probs: Any = None) -> dict[str, str]:
        row = {"path": item.key, "status": decoded.status, "reason": decoded.reason, **decoded.ids}
        if self.dims == 3:
            row["files"] = ";".join(item.paths)
        if probs is not None:
            row.update({c: f"{v:.6f}" for c, v in zip(self.prob_cols, probs)})
            row["predicted"] = self._predicted_label(probs)
        return row


def _list_list(batch: list[DecodedItem]) -> list[DecodedItem]:
    return batch


HIDDEN = "hidden file (name starts with '.', e.g. macOS ._* or .DS_Store): not read"


def iter_files(folder: Path) -> Iterable[Path]:
    """Every regular file under ``folder``, recursively, in a stable (sorted) order.

    Hidden folders (``.git``, ``.snapshot``, …) are not entered, as in :func:`medtransfer.io.series.list_files`;
    hidden files are listed (their rows say ``skipped``), so every file a user sees gets a row.
    """
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(root) / name


def _hidden(path: str) -> bool:
    return os.path.basename(path).startswith(".")


def _not_regular(path: str) -> WorkItem | None:
    """The row of a listed entry that is not a regular file (never opened: a FIFO would block the job)."""
    if os.path.islink(path) and not os.path.exists(path):
        return WorkItem(path, [path], "error", f"broken symbolic link (points to {os.readlink(path)})")
    if not os.path.isfile(path):
        return WorkItem(path, [path], "skipped", "not a regular file (a FIFO, socket or device): not read")
    return None


def _image_file(path: str) -> bool:
    """A NIfTI or PNG / JPEG / TIFF / BMP file: read directly, not as DICOM."""
    return is_nifti_path(path) or is_raster_path(path)


def work_items(folder: Path, dims: int, filt: SeriesFilter) -> list[WorkItem]:
    """The sorted work list: files for 2D models; series (plus files in no series) for 3D models."""
    listed = [str(p) for p in iter_files(folder)]
    special = {p: item for p in listed if (item := _not_regular(p)) is not None}
    files = [p for p in listed if p not in special]
    if dims == 2:
        items = [WorkItem(p, [p], "skipped", HIDDEN) if _hidden(p) else WorkItem(p, [p]) for p in files]
        return sorted(items + list(special.values()), key=lambda it: it.paths[0])
    from medtransfer.io.series import find_series, object_kind

    series, problems = find_series([p for p in files if not _hidden(p) and not _image_file(p)])
    volumes = {p for p in files if not _hidden(p) and is_nifti_path(p)}  # one NIfTI file: one volume
    items: list[WorkItem] = [WorkItem(p, [p]) for p in sorted(volumes)]
    in_series: set[str] = set()
    for s in series:
        paths = sorted(str(p) for p in s.paths)
        in_series.update(paths)
        key = f"{s.study_instance_uid}/{s.series_instance_uid}"
        item = WorkItem(key, paths, ids={"study_instance_uid": s.study_instance_uid,
                                         "series_instance_uid": s.series_instance_uid})
        skip = filt.reason_to_skip(s.modality, s.description, len(paths))
        if skip:
            item.status, item.reason = "skipped", skip
        items.append(item)
    unreadable = {p: prob for prob in problems for p in prob.paths}
    for p in files:
        if p in in_series or p in volumes:
            continue
        if _hidden(p):
            items.append(WorkItem(p, [p], "skipped", HIDDEN))
            continue
        if p in unreadable:
            status, reason = ("error", unreadable[p].message) if unreadable[p].kind != "not_dicom" \
                else not_dicom_status(p, unreadable[p].message)
            items.append(WorkItem(p, [p], status, reason))
            continue
        try:
            kind = object_kind(read_dicom_header(p))
            reason = f"not part of an image series ({kind} object)"
        except NotDicomError as exc:
            items.append(WorkItem(p, [p], *not_dicom_status(p, exc.reason)))
            continue
        except MedIOError as exc:
            items.append(WorkItem(p, [p], "error", exc.reason))
            continue
        items.append(WorkItem(p, [p], "skipped", reason, _header_ids(p)))
    # A series is named by its folder; two series sharing a folder get their UID appended.
    folders = Counter(os.path.commonpath(it.paths) if len(it.paths) > 1 else str(Path(it.paths[0]).parent)
                      for it in items if it.key not in files)
    for it in items:
        if it.key in files:
            continue
        common = os.path.commonpath(it.paths) if len(it.paths) > 1 else str(Path(it.paths[0]).parent)
        it.key = common if folders[common] == 1 else f"{common}#{it.ids['series_instance_uid']}"
    items += special.values()
    items.sort(key=lambda it: it.paths[0])
    return items


def _complete_rows(path: Path, fields: list[str]) -> list[dict[str, str]]:
    """Rows of a previous (possibly interrupted) output; a torn last line is dropped."""
    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and list(rows[0].keys()) != fields:
        raise MedTransferError(
            f"Cannot resume into '{path}': its columns differ from this model's ({', '.join(fields)}). "
            "Use another --out or remove the file."
        )
    return rows


class PredictionTable:
    """The output CSV, written as rows arrive: appended to ``<out>.partial`` and flushed after each
    write, then moved into place by :meth:`commit`, so a crash never leaves a half-written ``<out>``."""

    def __init__(self, out_csv: str | os.PathLike[str], fields: list[str]):
        self.path = Path(out_csv)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.fields = fields
        self._fh: Any = None
        self._writer: csv.DictWriter | None = None

    def completed_rows(self, keys: Iterable[str] | None = None) -> list[dict[str, str]]:
        """The rows a previous run left in ``<out>.partial`` and ``<out>`` (what ``resume`` keeps): each
        input once (the newer file first), only inputs of this job when ``keys`` lists them."""
        wanted = set(keys) if keys is not None else None
        seen: set[str] = set()
        rows = []
        for row in _complete_rows(self.partial, self.fields) + _complete_rows(self.path, self.fields):
            if row["path"] in seen or (wanted is not None and row["path"] not in wanted):
                continue
            seen.add(row["path"])
            rows.append(row)
        return rows

    def __enter__(self) -> "PredictionTable":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._disk_full_says_so():
            self._fh = open(self.partial, "w", newline="")
            self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, restval="")
            self._writer.writeheader()
            self._fh.flush()
        return self

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        with self._disk_full_says_so():
            self._writer.writerows(rows)
            self._fh.flush()

    @contextlib.contextmanager
    def _disk_full_says_so(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(errno.ENOSPC, f"No space left on device at {self.partial.parent} while writing "
                                    f"{self.partial.name}. The rows written so far are kept there: free some space "
                                    "and run the same command with --resume.") from None
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            self._fh.close()
        except OSError:  # the buffered tail of a full disk: the error that stopped the job says so
            if exc_info[0] is None:
                raise

    def commit(self) -> Path:
        """Move the finished table into place (atomically)."""
        os.replace(self.partial, self.path)
        return self.path


@contextlib.contextmanager
def output_lock(out_csv: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``<out>.lock`` for the whole job: a second job writing the same table is refused at once
    (its rows would otherwise tear and lose the first one's)."""
    import fcntl

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(out.name + ".lock")
    fh = open(lock, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UsageError(f"'{out}' is being written by another medtransfer job (pid {holder}, lock {lock}). Give "
                         "each job its own --out (e.g. part0.csv, part1.csv for --shard 0/2 and 1/2) or wait for "
                         "it to finish.") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()


def pending_items(items: list[WorkItem], done_keys: set[str]) -> list[WorkItem]:
    """The work items whose row is not yet written."""
    return [it for it in items if it.key not in done_keys]


def input_folder(input_dir: str | os.PathLike[str]) -> Path:
    """The input folder, or a message saying it is missing."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise MedTransferError(f"Input folder '{folder}' does not exist or is not a folder.")
    return folder


def finish_outputs(out: Path, run, opts: PredictOptions) -> None:
    """What follows a finished table: ``OUT.parquet`` and the study JSON files when asked for."""
    if opts.parquet:
        _write_parquet(out)
    if opts.study_json_dir is not None:
        write_study_jsons(out, opts.study_json_dir, run, opts.shard)


@dataclass
class BatchSummary:
    out_csv: Path
    counts: Counter
    rows: list[dict[str, Any]] | None
    """All rows (when ``keep_rows``), in output order."""

    @property
    def n_ok(self) -> int:
        return self.counts.get("ok", 0)


@dataclass(frozen=True)
class PredictOptions:
    """How a batch job runs and what it writes besides the table (the same for every engine)."""

    batch_size: int = 32
    workers: int = 0
    """Decoding processes beside the model (local engine; 0: decode in the main process)."""
    resume: bool = False
    """Keep the rows a previous or interrupted run wrote and do only the rest."""
    shard: tuple[int, int] | None = None
    """``(i, n)``: the i-th of n contiguous blocks of the sorted work list."""
    series_filter: SeriesFilter = field(default_factory=SeriesFilter)
    parquet: bool = False
    study_json_dir: str | os.PathLike[str] | None = None
    patient_fields: bool = False
    """Add PatientID / PatientName / PatientBirthDate columns (identifying: off by default)."""
    progress: bool = False


def options_with(options: PredictOptions | None, overrides: dict[str, Any]) -> PredictOptions:
    """``options`` (default ones when None) with keyword ``overrides``; an unknown name is a TypeError."""
    import dataclasses

    return dataclasses.replace(options or PredictOptions(), **overrides)


def run_batch(run, input_dir: str | os.PathLike[str], out_csv: str | os.PathLike[str],
              options: PredictOptions | None = None, *, keep_rows: bool = True,
              on_batch: Callable[[torch.Tensor, list[WorkItem], Any], None] | None = None,
              **overrides: Any) -> BatchSummary:
    """Predict every input under ``input_dir`` with a loaded run (see the module docstring and
    :class:`PredictOptions`; keyword ``overrides`` change single options, e.g. ``resume=True``).

    ``on_batch(x, items, probs)``, when given, is called once per model batch after the forward pass
    with the normalised input tensor (on the run's device), the :class:`WorkItem` of each of its rows
    and their probabilities (NumPy ``(N, classes)``); e.g. saliency maps
    (:class:`medtransfer.inference.saliency.SaliencyWriter`)."""
    opts = options_with(options, overrides)
    folder = input_folder(input_dir)
    items = shard_slice(work_items(folder, run.pre.spec.dims, opts.series_filter), opts.shard)
    with output_lock(out_csv):
        return _predict_items(run, items, out_csv, opts, keep_rows, on_batch)


def _predict_items(run, items: list[WorkItem], out_csv: Any, opts: PredictOptions, keep_rows: bool,
                   on_batch: Any = None) -> BatchSummary:
    rows_of, filt = RowBuilder(run, opts.patient_fields), opts.series_filter
    dims = run.pre.spec.dims
    table = PredictionTable(out_csv, rows_of.fields)
    previous = table.completed_rows([it.key for it in items]) if opts.resume else []
    todo = pending_items(items, {r["path"] for r in previous})
    if opts.resume:
        logger.info("resume: %d of %d inputs already done", len(items) - len(todo), len(items))

    counts: Counter = Counter(r["status"] for r in previous)
    kept: list[dict[str, Any]] | None = list(previous) if keep_rows else None
    loader = DataLoader(_Decode(todo, run.pre, dims, filt, opts.patient_fields), batch_size=opts.batch_size,
                        shuffle=False, num_workers=opts.workers, collate_fn=_list_list, persistent_workers=False,
                        worker_init_fn=lowest_cpu_priority if opts.workers else None,
                        prefetch_factor=4 if opts.workers else None)
    from rich.progress import Progress

    model = ModelStep(run)
    with table, Progress(disable=not opts.progress, transient=True) as bar:
        table.write(previous)
        task = bar.add_task("predicting", total=len(todo))
        for batch in loader:
            probs = model.probabilities(batch)
            if on_batch is not None and model.last_input is not None:
                ready = [(d, p) for d, p in zip(batch, probs) if p is not None]
                on_batch(model.last_input, [todo[d.index] for d, _ in ready], np.stack([p for _, p in ready]))
            rows = [rows_of.row(todo[d.index], d, p) for d, p in zip(batch, probs)]
            table.write(rows)
            counts.update(r["status"] for r in rows)
            if kept is not None:
                kept.extend(rows)
            bar.advance(task, len(batch))
    out = table.commit()
    finish_outputs(out, run, opts)
    logger.info("%d inputs: %s -> %s", sum(counts.values()), dict(counts), out)
    return BatchSummary(out, counts, kept)


def _write_parquet(csv_path: Path) -> Path:
    try:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
    except ImportError:
        raise MedTransferError("Parquet output needs pyarrow: pip install pyarrow") from None
    target = csv_path.with_suffix(".parquet")
    tmp = target.with_name(f".{target.name}.tmp")
    pq.write_table(pacsv.read_csv(csv_path), tmp)
    os.replace(tmp, target)
    return target


def _study_summary(rows: list[dict[str, str]], label_names: list[str]) -> dict[str, Any]:
    """Study-level view of the predicted rows: per class the highest probability over the study's
    images (or series) and the image that carries it; the labels predicted for any of them."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {"n_predicted": 0, "max_probability": {}, "predicted_labels": []}
    peak: dict[str, Any] = {}
    for name in label_names:
        best = max(ok, key=lambda r: float(r[f"prob_{name}"]))
        peak[name] = {"probability": float(best[f"prob_{name}"]), "path": best["path"]}
    labels = sorted({lab for r in ok for lab in r["predicted"].split(";") if lab})
    return {"n_predicted": len(ok), "max_probability": peak, "predicted_labels": labels}


def write_study_jsons(csv_path: str | os.PathLike[str], json_dir: str | os.PathLike[str], run,
                      shard: tuple[int, int] | None = None) -> list[Path]:
    """One ``<StudyInstanceUID>.json`` per study found in a finished prediction table.

    Each holds the model (backbone, classes, operating point), the status counts, a study-level
    summary and every row of the study (probabilities as numbers). Rows without a study UID
    (unreadable files) go to ``no-study-uid.json``. Under ``--shard i/n`` the names get
    ``.shard-i-of-n`` so that shards never overwrite each other's part of a study.
    """
    from datetime import datetime

    from medtransfer.metrics._utils import write_json_atomic

    out_dir = Path(json_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies: dict[str, list[dict[str, str]]] = {}
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            studies.setdefault(row.get("study_instance_uid") or "", []).append(row)
    model_info = {"backbone": run.checkpoint.get("backbone"), "run_dir": run.run_dir, "task": run.model.task,
                  "label_names": list(run.label_names), "operating_point": run.checkpoint.get("operating_point")}
    created = datetime.now().isoformat(timespec="seconds")
    suffix = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
    written = []
    for uid, rows in sorted(studies.items()):
        items = []
        for r in rows:
            item: dict[str, Any] = {k: v for k, v in r.items() if not k.startswith("prob_")}
            if r["status"] == "ok":
                item["probabilities"] = {n: float(r[f"prob_{n}"]) for n in run.label_names}
            if "files" in item:
                item["files"] = item["files"].split(";") if item["files"] else []
            items.append(item)
        doc = {
            "format": STUDY_JSON_FORMAT, "study_instance_uid": uid or None, "created": created,
            "model": model_info, "counts": dict(Counter(r["status"] for r in rows)),
            "summary": _study_summary(rows, run.label_names), "items": items,
        }
        safe = re.sub(r"[^0-9A-Za-z.\-]", "_", uid) if uid else "no-study-uid"
        path = out_dir / f"{safe}{suffix}.json"
        write_json_atomic(path, doc)
        written.append(path)
    logger.info("%d study JSON files -> %s", len(written), out_dir)
    return written
