"""Samples tables: which image, which label, which patient, which split.

Sources: a folder + labels CSV (DICOM or PNG files), a MedMNIST ``.npz`` file (official splits),
or the built-in synthetic demo. Splits are always grouped by patient.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.data.labels_csv import read_labels_csv
from medtransfer.errors import DataError
from medtransfer.options import OutsidePaths

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One labelled image. ``path`` is absolute; for ``.npz`` sources ``index`` points into the array."""

    path: str
    label: int | tuple[int, ...]
    """A class index; for multi-label data a 0/1 tuple with one entry per label."""
    patient_id: str
    split: str | None = None
    index: int | None = None


@dataclass
class SampleTable:
    """Samples plus what is needed to decode them (``source`` is ``"dicom"`` or ``"npz"``)."""

    samples: list[Sample]
    label_names: list[str]
    source: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """For ``npz`` sources: the image array of each split, keyed by split name."""
    task: str = "auto"
    """``multilabel`` when every sample carries a 0/1 vector; ``auto`` otherwise (binary/multiclass)."""

    def subset(self, split: str) -> list[Sample]:
        return [s for s in self.samples if s.split == split]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


NEGATIVE_NAMES = frozenset({"normal", "negative", "neg", "benign", "healthy", "no_finding", "nofinding",
                            "no_findings", "none", "absent", "no", "false", "control", "no_disease"})
"""Label names that mean 'nothing found'; they come first, so a binary task's positive class is the finding."""


def _is_negative(name: str) -> bool:
    return name.strip().lower().replace(" ", "_").replace("-", "_") in NEGATIVE_NAMES


def class_order(names: list[str] | set[str], classes: list[str] | None = None, source: str = "labels") -> list[str]:
    """Named labels in class-index order: ``classes`` when given (it must hold every name), else the
    names that mean 'nothing found' (normal, negative, benign, no_finding, …) first, the rest sorted.

    For a binary task the class at index 1 is the positive one: sensitivity, PPV and the AUC's
    direction refer to it, so the order is logged."""
    names = set(names)
    if classes:
        unknown = sorted(names - set(classes))
        if unknown:
            raise DataError(f"The {source} have classes {unknown} that data.classes={list(classes)} does not list.")
        order = list(classes)
    else:
        order = sorted(names, key=lambda n: (not _is_negative(n), n))
    if len(order) == 2:
        logger.info("classes: 0 = %s, 1 = %s (the positive class of the binary metrics; set data.classes "
                    "to choose)", order[0], order[1])
    return order


def _outside(paths: list[Path], root: Path, labels_csv: str | Path, policy: str) -> None:
    """Files of the CSV that lie outside ``--data`` (``../..``, absolute paths elsewhere): a warning, or
    refused with ``data.outside_paths=forbid`` (shared servers, where a CSV must not reach other data)."""
    top = root.resolve()
    outside = [p for p in paths if not p.resolve().is_relative_to(top)]
    if not outside:
        return
    shown = ", ".join(str(p) for p in outside[:3])
    if policy == OutsidePaths.FORBID:
        raise DataError(f"{len(outside)} file(s) in '{labels_csv}' lie outside --data '{root}' (e.g. {shown}) and "
                        "data.outside_paths=forbid refuses them. Move the files under --data or fix their paths.")
    logger.warning("%d file(s) in %s lie outside --data %s (e.g. %s); set data.outside_paths=forbid to refuse "
                   "such paths", len(outside), labels_csv, root, shown)


def samples_from_folder(data_dir: str | Path, labels_csv: str | Path, classes: list[str] | None = None,
                        outside_paths: str = "warn") -> SampleTable:
    """A folder of images and a CSV with ``path,label[,patient_id][,split]`` columns.

    Images: DICOM files, PNG / JPEG / TIFF / BMP files or 2D NIfTI images (the last two need the
    ``patient_id`` column; DICOM files fall back to their PatientID).

    Labels may be class indices or names; names take the order of ``classes`` (see
    :func:`class_order`: by default 'nothing found' names first). Without a ``patient_id`` column
    the DICOM PatientID is read from each file's header.
    """
    from medtransfer.io import MedIOError, is_nifti_path, is_raster_path, read_dicom_header

    root = Path(data_dir)
    rows = read_labels_csv(labels_csv)
    raw_labels = [r["label"] for r in rows]
    if all(lab.lstrip("-").isdigit() for lab in raw_labels):
        values = sorted({int(v) for v in raw_labels})
        if values[0] < 0:
            raise DataError(f"Labels in '{labels_csv}' must be non-negative class indices.")
        label_names = [str(v) for v in range(values[-1] + 1)]
        if classes:
            if len(classes) <= values[-1]:
                raise DataError(f"Labels in '{labels_csv}' go up to class index {values[-1]}, but data.classes "
                                f"names {len(classes)} classes: {list(classes)}.")
            label_names = list(classes)
        to_index = {str(v): v for v in range(values[-1] + 1)}
        to_index.update({lab: int(lab) for lab in raw_labels})
    else:
        label_names = class_order(set(raw_labels), classes, f"labels in '{labels_csv}'")
        to_index = {name: i for i, name in enumerate(label_names)}
    samples = []
    missing = []
    paths = [Path(r["path"]) if Path(r["path"]).is_absolute() else root / r["path"] for r in rows]
    _outside(paths, root, labels_csv, outside_paths)
    for row, path in zip(rows, paths):
        if not (path.is_file() or path.is_dir()):  # a folder: one DICOM series (3D backbones)
            missing.append(str(path))
            continue
        pid = row.get("patient_id") or ""
        if not pid and (is_raster_path(path) or is_nifti_path(path)):
            raise DataError(
                f"{path} is a {path.suffix.lstrip('.').upper() or 'NIfTI'} file, which carries no patient "
                "identity: add a patient_id column to the labels CSV so that splits can be grouped by patient."
            )
        if not pid:
            try:
                first = path if path.is_file() else next((q for q in sorted(path.rglob("*")) if q.is_file()), path)
                pid = str(read_dicom_header(first).get("PatientID", "") or "")
            except MedIOError as exc:
                raise DataError(f"Cannot read the PatientID of {exc.path}: {exc.reason}") from None
        if not pid:
            raise DataError(
                f"{path} has no PatientID and the labels CSV has no patient_id column; "
                "add one so that splits can be grouped by patient."
            )
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise DataError(f"Line {row['_line']} of '{labels_csv}' ({path}): split '{split}' must be one of "
                            f"{', '.join(SPLITS)}.")
        samples.append(Sample(str(path.resolve()), to_index[row["label"]], pid, split))
    if missing:
        shown = "; ".join(missing[:5])
        raise DataError(
            f"{len(missing)} file(s) listed in '{labels_csv}' do not exist under '{root}' (e.g. {shown}). "
            "Paths in the CSV are relative to --data unless absolute."
        )
    return SampleTable(samples, label_names, "dicom")


def samples_from_npz(path: str | Path) -> SampleTable:
    """A MedMNIST ``.npz`` file with its official train/val/test splits.

    MedMNIST has no patient identifiers; every image is its own "patient" (as in the official
    benchmark). Labels of shape ``(N, 1)`` are class indices; ``(N, K)`` 0/1 matrices are multi-label.
    """
    p = Path(path)
    try:
        npz = np.load(p)
    except Exception as exc:
        raise DataError(f"Cannot read '{p}' as a .npz file: {exc}") from None
    keys = set(npz.files)
    needed = {f"{s}_{k}" for s in SPLITS for k in ("images", "labels")}
    if not needed <= keys:
        raise DataError(
            f"'{p}' is not a MedMNIST-style file: it needs the arrays {', '.join(sorted(needed))}; "
            f"it has {', '.join(sorted(keys))}."
        )
    arrays: dict[str, np.ndarray] = {}
    samples: list[Sample] = []
    max_label = 0
    multilabel = npz["train_labels"].ndim == 2 and npz["train_labels"].shape[1] > 1
    for split in SPLITS:
        images = npz[f"{split}_images"]
        labels = npz[f"{split}_labels"]
        arrays[split] = images
        if multilabel:
            if not set(np.unique(labels).tolist()) <= {0, 1}:
                raise DataError(f"'{p}': multi-label targets must be 0/1.")
            max_label = labels.shape[1] - 1
            for i, row in enumerate(labels.astype(int)):
                samples.append(Sample(f"{p.resolve()}#{split}/{i}", tuple(row.tolist()), f"{split}-{i}", split, i))
            continue
        labels = labels.reshape(-1).astype(int)
        max_label = max(max_label, int(labels.max()))
        for i, lab in enumerate(labels):
            samples.append(Sample(f"{p.resolve()}#{split}/{i}", int(lab), f"{split}-{i}", split, i))
    label_names = [str(i) for i in range(max_label + 1)]
    return SampleTable(samples, label_names, "npz", arrays, "multilabel" if multilabel else "auto")


def split_by_patient(
    table: SampleTable, val_fraction: float, test_fraction: float, seed: int = 0
) -> SampleTable:
    """Assign splits to samples that have none, grouped by patient and stratified by label.

    Each patient's stratum is their most frequent label. Samples that already carry a split keep
    it; :func:`check_leakage` then guarantees no patient sits in two splits.
    """
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in table.samples:
        by_patient[s.patient_id].append(s)
    fixed = {pid for pid, ss in by_patient.items() if any(s.split for s in ss)}
    strata: dict[int, list[str]] = defaultdict(list)
    for pid in sorted(set(by_patient) - fixed):
        labels = Counter(s.label for s in by_patient[pid])
        strata[max(labels, key=lambda k: (labels[k], k))].append(pid)
    for stratum in sorted(strata):
        pids = strata[stratum]
        rng.shuffle(pids)
        n = len(pids)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3 and val_fraction > 0 and n_val == 0:
            n_val = 1
        if n >= 3 and test_fraction > 0 and n_test == 0:
            n_test = 1
        for i, pid in enumerate(pids):
            split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            for s in by_patient[pid]:
                s.split = split
    check_leakage(table.samples)
    return table


def subsample_train(table: SampleTable, fraction: float, seed: int = 0) -> SampleTable:
    """Keep ``fraction`` of the training patients (at least one per class), stratified by each
    patient's most frequent label; the others leave the table. Validation and test are untouched."""
    return _subsample_split(table, "train", fraction, seed)


def cap_val(table: SampleTable, max_images: int, seed: int = 0) -> SampleTable:
    """Keep about ``max_images`` validation images (whole patients, stratified like
    :func:`subsample_train`, at least one patient per class) when the split holds more; 0 keeps all.
    Model selection on a few thousand images is as decisive as on all of them and costs a fraction
    of the time per epoch. Training and test are untouched."""
    n_val = len(table.subset("val"))
    if max_images <= 0 or n_val <= max_images:
        return table
    return _subsample_split(table, "val", max_images / n_val, seed)


def _subsample_split(table: SampleTable, split: str, fraction: float, seed: int) -> SampleTable:
    if fraction >= 1.0:
        return table
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in table.subset(split):
        by_patient[s.patient_id].append(s)
    strata: dict[Any, list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        labels = Counter(s.label for s in by_patient[pid])
        strata[max(labels, key=lambda k: (labels[k], k))].append(pid)
    keep: set[str] = set()
    for stratum in sorted(strata, key=str):
        pids = strata[stratum]
        rng.shuffle(pids)
        keep.update(pids[: max(1, int(round(len(pids) * fraction)))])
    table.samples = [s for s in table.samples if s.split != split or s.patient_id in keep]
    return table


def check_leakage(samples: list[Sample]) -> None:
    """Raise :class:`DataError` when a patient appears in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        if s.split:
            seen[s.patient_id].add(s.split)
    leaked = {pid: splits for pid, splits in seen.items() if len(splits) > 1}
    if leaked:
        examples = ", ".join(f"{pid} ({'/'.join(sorted(sp))})" for pid, sp in list(leaked.items())[:5])
        raise DataError(
            f"{len(leaked)} patient(s) appear in more than one split: {examples}. "
            "Images of one patient must stay in one split; fix the 'split' column or drop it."
        )


def split_report(table: SampleTable) -> dict[str, Any]:
    """Patients and images per split and per class."""
    report: dict[str, Any] = {}
    for split in SPLITS:
        ss = table.subset(split)
        if table.task == "multilabel":
            per_class = {name: int(sum(s.label[i] for s in ss)) for i, name in enumerate(table.label_names)}
        else:
            counts = Counter(s.label for s in ss)
            per_class = {name: counts.get(i, 0) for i, name in enumerate(table.label_names)}
        report[split] = {
            "images": len(ss),
            "patients": len({s.patient_id for s in ss}),
            "per_class": per_class,
        }
    return report
