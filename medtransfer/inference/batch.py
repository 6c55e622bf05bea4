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
"""
from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from medtransfer.data.preprocess import UnsupportedImageError
from medtransfer.errors import MedTransferError
from medtransfer.io import (
    MedIOError,
    NoPixelDataError,
    NotDicomError,
    is_nifti_path,
    is_raster_path,
    read_dicom_header,
)

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


class _Decode(Dataset):
    """Decodes work items in DataLoader workers; never raises (failures become row statuses)."""

    def __init__(self, items: list[WorkItem], pre, dims: int, filt: SeriesFilter, patient_fields: bool = False):
        self.items, self.pre, self.dims, self.filt = items, pre, dims, filt
        self.patient_fields = patient_fields

    def __getitem__(self, i: int) -> dict[str, Any]:
        out = self._decode(i)
        if self.patient_fields:
            out["ids"].update(_patient_ids(self.items[i].paths[0]))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def _decode(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        out: dict[str, Any] = {"i": i, "tensor": None, "status": item.status, "reason": item.reason,
                               "ids": dict(item.ids)}
        if item.status:
            return out
        try:
            if _image_file(item.paths[0]):  # NIfTI / PNG: no DICOM header, so no UIDs and no selection by tags
                skip = self.filt.reason_to_skip("", "")
                if skip:
                    out.update(status="skipped", reason=skip)
                    return out
                load = self.pre.load_volume if self.dims == 3 else self.pre.load_image
                out.update(tensor=load(item.paths[0]), status="ok")
                return out
            if self.dims == 3:
                tensor, ids = self.pre.load_series(item.paths)
            else:
                tensor, meta = self.pre.load_dicom_with_meta(item.paths[0])
                ids = _ids(meta)
                skip = self.filt.reason_to_skip(meta.get("modality", ""), meta.get("series_description", ""))
                if skip:
                    out.update(status="skipped", reason=skip, ids=ids)
                    return out
            out.update(tensor=tensor, status="ok", ids=ids)
        except (NoPixelDataError, NotDicomError, UnsupportedImageError) as exc:
            out.update(status="skipped", reason=exc.reason, ids=_header_ids(item.paths[0]))
        except MedIOError as exc:
            out.update(status="error", reason=exc.reason, ids=_header_ids(item.paths[0]))
        except Exception as exc:  # one bad input never stops the batch
            out.update(status="error", reason=f"{type(exc).__name__}: {exc}", ids=_header_ids(item.paths[0]))
        return out


# Decoding workers run at the lowest CPU priority: when they and the model share the cores, the
# model's OpenMP threads keep running and the workers fill the gaps (measured on 2 cores: 0.84 instead
# of 0.80 of the model-only rate); with spare cores or a GPU the priority changes nothing.
WORKER_NICE = 19


def _lower_priority(_worker_id: int) -> None:
    try:
        os.nice(WORKER_NICE)
    except (AttributeError, OSError):  # no os.nice on Windows; a container may forbid it
        pass


def _list_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def _image_file(path: str) -> bool:
    """A NIfTI or PNG / JPEG / TIFF / BMP file: read directly, not as DICOM."""
    return is_nifti_path(path) or is_raster_path(path)


def work_items(folder: Path, dims: int, filt: SeriesFilter) -> list[WorkItem]:
    """The sorted work list: files for 2D models; series (plus files in no series) for 3D models."""
    files = [str(p) for p in iter_files(folder)]
    if dims == 2:
        return [WorkItem(p, [p], "skipped", HIDDEN) if _hidden(p) else WorkItem(p, [p]) for p in files]
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
            status = "skipped" if unreadable[p].kind == "not_dicom" else "error"
            items.append(WorkItem(p, [p], status, unreadable[p].message))
            continue
        try:
            kind = object_kind(read_dicom_header(p))
            reason = f"not part of an image series ({kind} object)"
        except MedIOError as exc:
            items.append(WorkItem(p, [p], "skipped" if isinstance(exc, NotDicomError) else "error", exc.reason))
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


@dataclass
class BatchSummary:
    out_csv: Path
    counts: Counter
    rows: list[dict[str, Any]] | None
    """All rows (when ``keep_rows``), in output order."""

    @property
    def n_ok(self) -> int:
        return self.counts.get("ok", 0)


def run_batch(
    run,
    input_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    workers: int = 0,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    series_filter: SeriesFilter | None = None,
    parquet: bool = False,
    study_json_dir: str | os.PathLike[str] | None = None,
    patient_fields: bool = False,
    keep_rows: bool = True,
    progress: bool = False,
    on_batch: Callable[[torch.Tensor, list[WorkItem], Any], None] | None = None,
) -> BatchSummary:
    """Predict every input under ``input_dir`` with a loaded run (see the module docstring).

    ``on_batch(x, items, probs)``, when given, is called once per model batch after the forward pass
    with the normalised input tensor (on the run's device), the :class:`WorkItem` of each of its rows
    and their probabilities (NumPy ``(N, classes)``); e.g. saliency maps
    (:class:`medtransfer.inference.saliency.SaliencyWriter`)."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise MedTransferError(f"Input folder '{folder}' does not exist or is not a folder.")
    filt = series_filter or SeriesFilter()
    dims = run.pre.spec.dims
    prob_cols = [f"prob_{n}" for n in run.label_names]
    fields = (BASE_FIELDS + (PATIENT_FIELDS if patient_fields else []) + (["files"] if dims == 3 else [])
              + prob_cols + ["predicted"])
    items = shard_slice(work_items(folder, dims, filt), shard)

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    previous = (_complete_rows(out, fields) + _complete_rows(partial, fields)) if resume else []
    done = {r["path"] for r in previous}
    todo = [it for it in items if it.key not in done]
    if resume:
        logger.info("resume: %d of %d inputs already done", len(items) - len(todo), len(items))

    counts: Counter = Counter(r["status"] for r in previous)
    kept: list[dict[str, Any]] | None = list(previous) if keep_rows else None
    pin = run.device.type == "cuda"
    loader = DataLoader(_Decode(todo, run.pre, dims, filt, patient_fields), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_list_list, persistent_workers=False,
                        worker_init_fn=_lower_priority if workers else None,
                        prefetch_factor=4 if workers else None)
    from rich.progress import Progress

    from medtransfer.backbones import check_input_contract

    checked = False
    with open(partial, "w", newline="") as fh, Progress(disable=not progress, transient=True) as bar:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(previous)
        fh.flush()
        task = bar.add_task("predicting", total=len(todo))
        for batch in loader:
            ready = [b for b in batch if b["tensor"] is not None]
            if ready:
                x = torch.stack([b["tensor"] for b in ready])
                if pin:
                    x = x.pin_memory()
                x = run.pre.normalize(x.to(run.device, non_blocking=pin))
                if not checked:  # a real batch against the weights' contract, once per job
                    check_input_contract(x, run.checkpoint["backbone"], channels=run.pre.spec.channels, dims=dims)
                    checked = True
                with torch.no_grad(), torch.autocast(run.device.type, enabled=run.device.type == "cuda"):
                    logits = run.model(x)
                probs = run.model.probabilities(logits).cpu().numpy()
                for b, p in zip(ready, probs):
                    b["probs"] = p
                if on_batch is not None:
                    on_batch(x, [todo[b["i"]] for b in ready], probs)
            rows = []
            for b in batch:
                item = todo[b["i"]]
                row = {"path": item.key, "status": b["status"], "reason": b["reason"], **b["ids"]}
                if dims == 3:
                    row["files"] = ";".join(item.paths)
                if "probs" in b:
                    row.update({c: f"{v:.6f}" for c, v in zip(prob_cols, b["probs"])})
                    row["predicted"] = run.predicted_label(b["probs"])
                rows.append(row)
                counts[row["status"]] += 1
            writer.writerows(rows)
            fh.flush()
            if kept is not None:
                kept.extend(rows)
            bar.advance(task, len(batch))
    os.replace(partial, out)
    if parquet:
        _write_parquet(out)
    if study_json_dir is not None:
        write_study_jsons(out, study_json_dir, run, shard)
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
