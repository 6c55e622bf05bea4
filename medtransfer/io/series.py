"""DICOM folder → series → volume.

Files are grouped by StudyInstanceUID / SeriesInstanceUID; slices are ordered by
ImagePositionPatient projected on the slice normal (InstanceNumber only breaks ties or stands in
when positions are missing). Missing and duplicate slices, uneven spacing, gantry tilt, mixed
orientations and mixed sizes are reported as :class:`~medtransfer.io.volume.Problem` entries; the
volume follows the convention documented in :mod:`medtransfer.io.volume` (RAS affine, array axes
column/row/slice).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.io.dicom import (
    MedIOError,
    NoPixelDataError,
    NotDicomError,
    _n_frames,
    _spacing,
    frame_geometry,
    read_dicom,
    read_dicom_header,
    transfer_syntax,
)
from medtransfer.io.volume import LPS_TO_RAS, Problem, Volume

logger = logging.getLogger(__name__)

# SOP classes that carry no image to build a volume from (the inventory lists them separately).
NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "SR",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.8": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.66": "REG",
    "1.2.840.10008.5.1.4.1.1.11.": "PR",
    "1.2.840.10008.5.1.4.1.1.9.": "WAVEFORM",
    "1.2.840.10008.5.1.4.1.1.104.": "ENCAPSULATED",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}
_NON_IMAGE_MODALITIES = {"SR": "SR", "RTSTRUCT": "RTSTRUCT", "RTPLAN": "RTPLAN", "SEG": "SEG", "PR": "PR", "KO": "KO"}


def object_kind(ds) -> str:
    """``"image"`` or the kind of non-image object (SR, RTSTRUCT, SEG, PR, KO, DICOMDIR, …).

    ``"NO_PIXEL_DATA"``: an image SOP class whose header has no image attributes (a broken file).
    """
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    if "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    if sop == "1.2.840.10008.5.1.4.1.1.88.59":
        return "KO"
    for prefix, kind in NON_IMAGE_SOP_PREFIXES.items():
        if sop.startswith(prefix):
            return kind
    modality = str(ds.get("Modality", ""))
    if modality in _NON_IMAGE_MODALITIES:
        return _NON_IMAGE_MODALITIES[modality]
    if "Rows" not in ds and "PixelData" not in ds:
        name = getattr(ds.get("SOPClassUID"), "name", "")
        return "NO_PIXEL_DATA" if str(name).endswith("Image Storage") else "OTHER"
    return "image"


@dataclass
class SliceInfo:
    """What ordering needs to know about one slice (a file, or one frame of a multi-frame file)."""

    path: str
    frame: int | None
    rows: int
    columns: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    instance_number: int | None
    sop_instance_uid: str = ""

    @property
    def label(self) -> str:
        return self.path if self.frame is None else f"{self.path} (frame {self.frame + 1})"


@dataclass
class SliceOrder:
    """Result of :func:`order_slices`: the kept slices in order, their geometry and the problems."""

    slices: list[SliceInfo]
    positions: np.ndarray  # along the normal, mm
    affine_lps: np.ndarray
    problems: list[Problem] = field(default_factory=list)


def list_files(source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], recursive: bool = True) -> list[Path]:
    """Every regular file under a folder (hidden files and folders skipped), or the given files."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_file():
            return [root]
        pattern = root.rglob("*") if recursive else root.glob("*")
        return sorted(
            p for p in pattern
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    return [Path(p) for p in source]


def slice_infos(ds, path: str | os.PathLike[str]) -> list[SliceInfo]:
    """One :class:`SliceInfo` per frame with a plane position (one per file for classic images)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    number = ds.get("InstanceNumber")
    number = int(number) if number not in (None, "") else None
    uid = str(ds.get("SOPInstanceUID", ""))
    geom = frame_geometry(ds)
    pos, ori = geom["positions"], geom["orientations"]
    n = _n_frames(ds)
    if n > 1 and pos is not None and len(pos) == n:
        return [
            SliceInfo(str(path), i, rows, cols, pos[i], ori[min(i, len(ori) - 1)] if ori is not None else None, i + 1, uid)
            for i in range(n)
        ]
    return [
        SliceInfo(str(path), None, rows, cols, None if pos is None else pos[0], None if ori is None else ori[0], number, uid)
    ]


def _orientation_key(o: np.ndarray | None) -> tuple | None:
    return None if o is None else tuple(np.round(o, 3) + 0.0)


def _unit_directions(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column direction of ImageOrientationPatient scaled to unit length (files store them rounded
    or not quite normalised), and the unit slice normal (row × column)."""
    ori = np.asarray(orientation, dtype=float)
    row_dir = ori[:3] / (np.linalg.norm(ori[:3]) or 1.0)
    col_dir = ori[3:] / (np.linalg.norm(ori[3:]) or 1.0)
    normal = np.cross(row_dir, col_dir)
    return row_dir, col_dir, normal / (np.linalg.norm(normal) or 1.0)


def order_slices(
    slices: Sequence[SliceInfo], pixel_spacing: Sequence[float] | None = None, default_thickness: float | None = None
) -> SliceOrder:
    """Order slices along their normal and report what stops them forming a regular grid.

    Problems (``kind``): ``mixed_size`` and ``mixed_orientation`` (minority slices left out),
    ``no_position`` (InstanceNumber order used), ``duplicate_slice`` (the first by InstanceNumber kept),
    ``missing_slice`` (gap of about 2× the usual spacing or more), ``uneven_spacing`` and
    ``gantry_tilt`` (slice positions sheared against the normal; the affine keeps the shear).
    """
    items = list(slices)
    if not items:
        raise ValueError("order_slices needs at least one slice")
    problems: list[Problem] = []
    items = _keep_main_size(items, problems)
    located = _located(items, problems)
    spacing = list(pixel_spacing or (1.0, 1.0))
    if not located:
        items.sort(key=lambda s: (s.instance_number is None, s.instance_number or 0, s.label))
        affine = np.diag([spacing[1], spacing[0], default_thickness or 1.0, 1.0])
        return SliceOrder(items, np.arange(len(items), dtype=float) * affine[2, 2], affine, problems)
    items = _keep_main_orientation(located, problems)
    row_dir, col_dir, normal = _unit_directions(items[0].orientation)
    dist = np.array([float(np.dot(s.position, normal)) for s in items])
    order = sorted(range(len(items)), key=lambda i: (dist[i], items[i].instance_number or 0, items[i].label))
    items, dist = _drop_duplicates([items[i] for i in order], dist[order], problems)
    positions = np.array([s.position for s in items], dtype=float)
    if len(items) > 1:
        step = _slice_step(items, dist, positions, normal, problems)
    else:
        step = normal * float(default_thickness or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return SliceOrder(items, dist, affine, problems)


def _keep_main_size(items: list[SliceInfo], problems: list[Problem]) -> list[SliceInfo]:
    """The slices of the most common rows × columns (``mixed_size`` for the others)."""
    sizes = Counter((s.rows, s.columns) for s in items)
    main_size = sizes.most_common(1)[0][0]
    odd = [s for s in items if (s.rows, s.columns) != main_size]
    if odd:
        others = ", ".join(f"{r}×{c}" for (r, c) in sizes if (r, c) != main_size)
        problems.append(Problem(
            "mixed_size",
            f"{len(odd)} of {len(items)} slices are {others} instead of {main_size[0]}×{main_size[1]}; they were left out",
            [s.label for s in odd],
        ))
    return [s for s in items if (s.rows, s.columns) == main_size]


def _located(items: list[SliceInfo], problems: list[Problem]) -> list[SliceInfo]:
    """The slices with a position and an orientation (``no_position`` for the others)."""
    located = [s for s in items if s.position is not None and s.orientation is not None]
    if len(located) < len(items):
        missing = [s for s in items if s not in located]
        problems.append(Problem(
            "no_position",
            f"{len(missing)} of {len(items)} slices lack ImagePositionPatient/ImageOrientationPatient; "
            + ("ordered by InstanceNumber, geometry unknown" if not located else "they were left out"),
            [s.label for s in missing],
        ))
    return located


def _keep_main_orientation(items: list[SliceInfo], problems: list[Problem]) -> list[SliceInfo]:
    """The slices of the most common orientation (``mixed_orientation`` for the others)."""
    orientations = Counter(_orientation_key(s.orientation) for s in items)
    main_ori = orientations.most_common(1)[0][0]
    odd = [s for s in items if _orientation_key(s.orientation) != main_ori]
    if odd:
        problems.append(Problem(
            "mixed_orientation",
            f"{len(odd)} of {len(items)} slices have another ImageOrientationPatient than "
            f"[{', '.join(f'{v:g}' for v in main_ori)}]; "
            "they were left out",
            [s.label for s in odd],
        ))
    return [s for s in items if _orientation_key(s.orientation) == main_ori]


def _drop_duplicates(items: list[SliceInfo], dist: np.ndarray, problems: list[Problem]
                     ) -> tuple[list[SliceInfo], np.ndarray]:
    """Sorted slices without those at the same position along the normal (within 10 µm) as an earlier
    one (``duplicate_slice`` per group, naming the slice kept)."""
    keep = [0]
    for i in range(1, len(items)):
        if abs(dist[i] - dist[keep[-1]]) >= 0.01:
            keep.append(i)
    if len(keep) == len(items):
        return items, dist
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(max(j for j in keep if j <= i), []).append(i)
    for k, members in groups.items():
        if len(members) > 1:
            problems.append(Problem(
                "duplicate_slice",
                f"{len(members)} slices at the same position ({dist[k]:.2f} mm along the normal); "
                f"kept {items[k].label}",
                [items[i].label for i in members],
            ))
    return [items[i] for i in keep], dist[keep]


def _slice_step(items: list[SliceInfo], dist: np.ndarray, positions: np.ndarray, normal: np.ndarray,
                problems: list[Problem]) -> np.ndarray:
    """The affine's slice column: the median step between regular neighbours, scaled to the median
    spacing along the normal; reports ``missing_slice``, ``uneven_spacing`` and ``gantry_tilt``."""
    gaps = np.diff(dist)
    step_len = float(np.median(gaps))
    tol = max(0.01 * step_len, 0.01)
    for i in np.flatnonzero(gaps > 1.5 * step_len):
        n_missing = int(round(gaps[i] / step_len)) - 1
        problems.append(Problem(
            "missing_slice",
            f"gap of {gaps[i]:.3g} mm between slices at {dist[i]:.2f} and {dist[i + 1]:.2f} mm (usual spacing "
            f"{step_len:.3g} mm): about {max(n_missing, 1)} slice(s) missing",
            [items[i].label, items[i + 1].label],
        ))
    uneven = [i for i in range(len(gaps)) if abs(gaps[i] - step_len) > tol and gaps[i] <= 1.5 * step_len]
    if uneven:
        problems.append(Problem(
            "uneven_spacing",
            f"slice spacing varies from {gaps.min():.4g} to {gaps.max():.4g} mm (median {step_len:.4g} mm); "
            "the volume uses the median",
            [items[i + 1].label for i in uneven],
        ))
    steps = np.diff(positions, axis=0)
    along = steps @ normal
    inplane = np.linalg.norm(steps - np.outer(along, normal), axis=1)
    angles = np.degrees(np.arctan2(inplane, np.abs(along)))
    regular = gaps <= 1.5 * step_len
    step = np.median(steps[regular], axis=0) if regular.any() else normal * step_len
    step = step / max(float(np.dot(step, normal)), 1e-9) * step_len
    if float(np.median(angles)) > 0.5:
        problems.append(Problem(
            "gantry_tilt",
            f"slice positions are sheared {float(np.median(angles)):.2f}° from the slice normal (gantry tilt); "
            "the affine keeps the shear, resample before treating voxels as orthogonal",
            [items[0].label],
        ))
    return step


@dataclass
class SeriesFiles:
    """The files of one series as found by :func:`find_series` (headers only)."""

    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]
    headers: list[Any]

    @property
    def description(self) -> str:
        return str(self.headers[0].get("SeriesDescription", "")) if self.headers else ""

    @property
    def modality(self) -> str:
        return str(self.headers[0].get("Modality", "")) if self.headers else ""


def find_series(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, recursive: bool = True
) -> tuple[list[SeriesFiles], list[Problem]]:
    """Group the image files of a folder (or a list of files) by study and series, headers only.

    Returns the image series and the problems met (``unreadable`` and ``not_dicom`` files; non-image objects are
    not problems and are silently passed over here, see :func:`medtransfer.io.inventory`).
    """
    problems: list[Problem] = []
    groups: dict[tuple[str, str], SeriesFiles] = {}
    for path in list_files(source, recursive):
        try:
            ds = read_dicom_header(path)
        except MedIOError as exc:
            problems.append(Problem("not_dicom" if isinstance(exc, NotDicomError) else "unreadable", exc.reason,
                                    [str(path)]))
            continue
        if object_kind(ds) != "image":
            continue
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        group = groups.setdefault(key, SeriesFiles(key[0], key[1], [], []))
        group.paths.append(path)
        group.headers.append(ds)
    return list(groups.values()), problems


def read_series(
    source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    series_uid: str | None = None,
    strict: bool = False,
    invert_monochrome1: bool = True,
    recursive: bool = True,
) -> Volume:
    """Read one DICOM series (a folder, a list of files, or one multi-frame file) into a :class:`Volume`.

    With several series in ``source`` pass ``series_uid``. Files that cannot be read or decoded
    and slices that do not fit the grid are left out and listed in ``volume.problems`` (every
    file is reported); ``strict=True`` raises :class:`MedIOError` on any problem instead.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else "the given files"
    series, problems = find_series(source, recursive=recursive)
    if series_uid is not None:
        series = [s for s in series if s.series_instance_uid == series_uid]
        if not series:
            raise MedIOError(where, f"no image series with SeriesInstanceUID {series_uid}")
    if not series:
        detail = f" ({len(problems)} unreadable file(s), e.g. {problems[0].paths[0]}: {problems[0].message})" if problems else ""
        raise MedIOError(where, f"no DICOM image series found{detail}")
    if len(series) > 1:
        listing = "; ".join(
            f"{s.series_instance_uid} ({s.modality} '{s.description}', {len(s.paths)} files)" for s in series
        )
        raise MedIOError(where, f"holds {len(series)} series, pass series_uid= one of: {listing}")
    chosen = series[0]

    images: dict[str, Any] = {}
    infos: list[SliceInfo] = []
    for path, header in zip(chosen.paths, chosen.headers):
        try:
            image = read_dicom(path, invert_monochrome1=invert_monochrome1)
        except NoPixelDataError:
            continue
        except MedIOError as exc:
            problems.append(Problem("undecodable", exc.reason, [str(path)]))
            continue
        images[str(path)] = image
        infos.extend(slice_infos(header, path))
    if not infos:
        raise MedIOError(where, "no slice of the series could be decoded: " + "; ".join(
            f"{p.paths[0]}: {p.message}" for p in problems[:3]))

    first_header = chosen.headers[0]
    geom = frame_geometry(first_header)
    thickness = geom["spacing_between_slices"] or geom["slice_thickness"]
    ordered = order_slices(infos, geom["pixel_spacing"], thickness)
    problems.extend(ordered.problems)
    if strict and problems:
        raise MedIOError(where, "series problems: " + "; ".join(f"{p.kind}: {p.message}" for p in problems))

    planes = []
    for s in ordered.slices:
        arr = images[s.path].array
        planes.append(arr if s.frame is None else arr[s.frame])
    if planes[0].ndim != 2:
        raise MedIOError(where, f"colour or multi-dimensional slices ({planes[0].shape}) cannot form a volume")
    stack = np.stack(planes)  # (Z, rows, cols)
    array = np.ascontiguousarray(stack.transpose(2, 1, 0))  # (cols, rows, Z) = (X, Y, Z)

    first = images[ordered.slices[0].path].meta
    meta = {
        key: first.get(key)
        for key in (
            "study_instance_uid", "series_instance_uid", "frame_of_reference_uid", "patient_id", "modality",
            "series_description", "photometric_interpretation", "window_center", "window_width", "inverted",
            "transfer_syntax", "value_range",
        )
    }
    meta.update(
        source=where,
        files=[s.path for s in ordered.slices],
        frames=[s.frame for s in ordered.slices],
        sop_instance_uids=[s.sop_instance_uid for s in ordered.slices],
        slice_positions=[float(d) for d in ordered.positions],
        affine_lps=ordered.affine_lps.tolist(),
        orientation_convention="RAS",
        transfer_syntax=transfer_syntax(first_header),
        pixel_spacing=_spacing(first.get("pixel_spacing")),
        slice_thickness=geom["slice_thickness"],
        spacing_between_slices=geom["spacing_between_slices"],
    )
    volume = Volume(array.astype(np.float32, copy=False), LPS_TO_RAS @ ordered.affine_lps, meta, problems)
    for p in problems:
        logger.info("%s: %s (%s)", where, p.message, ", ".join(p.paths[:3]))
    return volume
