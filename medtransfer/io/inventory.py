"""What is in a DICOM folder: patients, studies, series, non-image objects and problems.

Reads headers only (``stop_before_pixels``) unless ``decode_check=True``, so a folder of
thousands of files is listed in seconds. Never reports patient names or birth dates.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medtransfer.io.decoders import decoder_available, missing_decoder_hint
from medtransfer.io.dicom import (
    MedIOError,
    NoPixelDataError,
    NotDicomError,
    checked_frame_count,
    frame_geometry,
    read_dicom,
    read_dicom_header,
    transfer_syntax,
)
from medtransfer.io.series import list_files, object_kind, order_slices, slice_infos
from medtransfer.io.volume import Problem


def _uid_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        return UID(uid).name if uid else ""
    except Exception:  # pragma: no cover
        return uid


def inventory(folder: str | os.PathLike[str], *, decode_check: bool = False, recursive: bool = True) -> dict[str, Any]:
    """Scan ``folder`` and describe it as a JSON-serialisable dict.

    Keys: ``root``; ``counts`` (files, patients, studies, series, images, non_image, problems, and
    ``by_modality`` / ``non_image_by_kind`` / ``problems_by_kind``); ``patients``; ``studies``;
    ``series`` (modality, description, slices, size, spacing, transfer syntax, photometric
    interpretation, per-series problems); ``non_image`` (SR, RTSTRUCT, SEG, PR, KO, DICOMDIR, …);
    ``problems`` (one entry per problem, each with ``kind``, ``message``, ``path`` and ``paths``;
    kinds: not_dicom, unreadable, no_pixel_data, undecodable, invalid_number_of_frames (the frames the
    pixel data holds are counted instead), and the series problems of
    :func:`medtransfer.io.series.order_slices`: mixed_size, mixed_orientation, no_position,
    duplicate_slice, missing_slice, uneven_spacing, gantry_tilt). Series ``spacing`` is
    ``[row, column, slice]`` in mm (slice spacing from the positions; None when unknown).

    ``decode_check=True`` also decodes every image and reports those that fail (slower).
    Raises :class:`MedIOError` when ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise MedIOError(root, "not a directory")
    files = list_files(root, recursive)
    scan = _Scan()
    for path in files:
        scan.add(path, decode_check)
    series = {}
    for key, members in scan.series_headers.items():
        series[key], series_problems = _describe_series(key, members, scan.frames, root)
        scan.problems.extend(series_problems)
    studies, patients = _studies_and_patients(series, scan.non_image)
    problem_dicts = [p.to_dict() for p in scan.problems]
    return {
        "root": str(root),
        "decode_check": decode_check,
        "counts": {
            "files": len(files),
            "patients": len(patients),
            "studies": len(studies),
            "series": len(series),
            "images": sum(len(v) for v in scan.series_headers.values()),
            "non_image": len(scan.non_image),
            "problems": len(problem_dicts),
            "by_modality": dict(Counter(s["modality"] for s in series.values())),
            "non_image_by_kind": dict(Counter(o["kind"] for o in scan.non_image)),
            "problems_by_kind": dict(Counter(p["kind"] for p in problem_dicts)),
        },
        "patients": list(patients.values()),
        "studies": list(studies.values()),
        "series": list(series.values()),
        "non_image": scan.non_image,
        "problems": problem_dicts,
    }


class _Scan:
    """The headers of a folder, file by file: image headers grouped by (study, series), non-image
    objects, frame counts and the problems of single files, in the order the files were read."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.non_image: list[dict[str, Any]] = []
        self.series_headers: dict[tuple[str, str], list[tuple[Path, Any]]] = defaultdict(list)
        self.frames: dict[Path, int] = {}

    def add(self, path: Path, decode_check: bool) -> None:
        try:
            ds = read_dicom_header(path)
        except MedIOError as exc:
            kind = "not_dicom" if isinstance(exc, NotDicomError) else "unreadable"
            self.problems.append(Problem(kind, exc.reason, [str(path)]))
            return
        kind = object_kind(ds)
        if kind == "NO_PIXEL_DATA":
            self.problems.append(Problem(
                "no_pixel_data", f"{_uid_name(str(ds.get('SOPClassUID', '')))} object without an image", [str(path)]
            ))
        elif kind != "image":
            self.non_image.append(_non_image_entry(path, ds, kind))
        else:
            self._add_image(path, ds, decode_check)

    def _add_image(self, path: Path, ds: Any, decode_check: bool) -> None:
        key = (str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))
        self.series_headers[key].append((path, ds))
        self.frames[path], frames_problem = checked_frame_count(path, ds)
        if frames_problem is not None:
            self.problems.append(frames_problem)
        ts = transfer_syntax(ds)
        if not decoder_available(ts):
            self.problems.append(Problem(
                "undecodable", f"transfer syntax {_uid_name(ts) or ts} has no installed decoder; {missing_decoder_hint(ts)}",
                [str(path)],
            ))
        elif decode_check:
            try:
                read_dicom(path)
            except NoPixelDataError:
                pass
            except MedIOError as exc:
                self.problems.append(Problem("undecodable", exc.reason, [str(exc.path)]))


def _non_image_entry(path: Path, ds: Any, kind: str) -> dict[str, Any]:
    return {
        "path": str(path),
        "kind": kind,
        "sop_class": _uid_name(str(ds.get("SOPClassUID", ""))) or kind,
        "modality": str(ds.get("Modality", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
    }


def _slice_geometry(members: list[tuple[Path, Any]], geom: dict[str, Any]) -> tuple[float | None, list[Problem]]:
    """The slice spacing of a series from its positions (None when unknown) and its ordering problems."""
    infos = [info for path, ds in members for info in slice_infos(ds, path)]
    if len(infos) <= 1:
        return None, []
    try:
        ordered = order_slices(infos, geom["pixel_spacing"], geom["slice_thickness"])
    except Exception as exc:  # geometry too broken to analyse
        return None, [Problem("inconsistent_series", f"slice geometry cannot be analysed: {exc}",
                              [members[0][0].as_posix()])]
    spacing = None
    if not any(p.kind == "no_position" for p in ordered.problems) and len(ordered.slices) > 1:
        spacing = float(abs(ordered.affine_lps[:3, 2] @ _normal(ordered.affine_lps)))
    return spacing, list(ordered.problems)


def _describe_series(key: tuple[str, str], members: list[tuple[Path, Any]], frames: dict[Path, int],
                     root: Path) -> tuple[dict[str, Any], list[Problem]]:
    """One series' entry of the inventory and its problems (messages prefixed with the series UID)."""
    ds0 = members[0][1]
    geom = frame_geometry(ds0)
    slice_spacing, series_problems = _slice_geometry(members, geom)
    for p in series_problems:
        p.message = f"series {key[1]}: {p.message}"
    syntaxes = sorted({transfer_syntax(ds) for _, ds in members})
    photometrics = sorted({str(ds.get("PhotometricInterpretation", "")) for _, ds in members})
    sizes = Counter((int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in members)
    rows, cols = sizes.most_common(1)[0][0]
    spacing = geom["pixel_spacing"]
    entry = {
        "series_instance_uid": key[1],
        "study_instance_uid": key[0],
        "patient_id": str(ds0.get("PatientID", "")),
        "modality": str(ds0.get("Modality", "")),
        "description": str(ds0.get("SeriesDescription", "")),
        "series_number": None if ds0.get("SeriesNumber") in (None, "") else int(ds0.get("SeriesNumber")),
        "files": len(members),
        "slices": sum(frames[path] for path, _ in members),
        "size": [rows, cols],
        "spacing": None if spacing is None else [spacing[0], spacing[1], slice_spacing],
        "slice_thickness": geom["slice_thickness"],
        "transfer_syntax": syntaxes[0] if len(syntaxes) == 1 else syntaxes,
        "transfer_syntax_name": ", ".join(_uid_name(t) or "unknown" for t in syntaxes),
        "photometric_interpretation": photometrics[0] if len(photometrics) == 1 else photometrics,
        "problems": [p.kind for p in series_problems],
        "folder": str(Path(os.path.commonpath([str(p) for p, _ in members])).relative_to(root))
        if len(members) > 1 else str(members[0][0].parent.relative_to(root)),
    }
    return entry, series_problems


def _studies_and_patients(series: dict[tuple[str, str], dict[str, Any]], non_image: list[dict[str, Any]]
                          ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Studies (their series; also those holding only non-image objects) and patients (their studies)."""
    studies: dict[str, dict[str, Any]] = {}
    for (study_uid, series_uid), s in series.items():
        st = studies.setdefault(study_uid, {
            "study_instance_uid": study_uid, "patient_id": s["patient_id"], "series": [],
        })
        st["series"].append(series_uid)
    for obj in non_image:
        if obj["study_instance_uid"] and obj["study_instance_uid"] not in studies:
            studies[obj["study_instance_uid"]] = {
                "study_instance_uid": obj["study_instance_uid"], "patient_id": obj["patient_id"], "series": [],
            }
    patients: dict[str, dict[str, Any]] = {}
    for st in studies.values():
        patients.setdefault(st["patient_id"], {"patient_id": st["patient_id"], "studies": []})["studies"].append(
            st["study_instance_uid"]
        )
    return studies, patients


def _normal(affine_lps) -> Any:
    import numpy as np

    n = np.cross(affine_lps[:3, 0], affine_lps[:3, 1])
    return n / (np.linalg.norm(n) or 1.0)


def _fmt_spacing(spacing: list | None) -> str:
    if not spacing:
        return "?"
    return " × ".join("?" if v is None else f"{v:.4g}" for v in spacing) + " mm"


def render_inventory(inv: dict[str, Any], *, max_problems: int = 50) -> str:
    """Plain-text report of :func:`inventory` output (no patient names or birth dates)."""
    c = inv["counts"]
    lines = [
        f"{inv['root']}: {c['files']} files, {c['patients']} patient(s), {c['studies']} study(ies), "
        f"{c['series']} series, {c['images']} image file(s), {c['non_image']} non-image object(s), "
        f"{c['problems']} problem(s)",
    ]
    by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in inv["series"]:
        by_study[s["study_instance_uid"]].append(s)
    for patient in inv["patients"]:
        lines.append(f"Patient {patient['patient_id'] or '(no PatientID)'}")
        for study_uid in patient["studies"]:
            lines.append(f"  Study {study_uid}")
            for s in sorted(by_study.get(study_uid, []), key=lambda s: (s["series_number"] or 0, s["description"])):
                size = f"{s['size'][0]}×{s['size'][1]}"
                flag = f"  [{', '.join(s['problems'])}]" if s["problems"] else ""
                lines.append(
                    f"    {s['modality'] or '?':<3} {s['description'] or '(no description)'!s:<24} {s['slices']:>4} slice(s) "
                    f"{size:>9}  {_fmt_spacing(s['spacing'])}  {s['photometric_interpretation']}  "
                    f"{s['transfer_syntax_name']}  ({s['folder'] or '.'}){flag}"
                )
    if inv["non_image"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(c["non_image_by_kind"].items()))
        lines.append(f"Non-image objects ({kinds})")
        for obj in inv["non_image"]:
            lines.append(f"  {obj['kind']:<9} {obj['path']}")
    if inv["problems"]:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(c["problems_by_kind"].items()))
        lines.append(f"Problems ({kinds})")
        for p in inv["problems"][:max_problems]:
            lines.append(f"  {p['kind']:<18} {p['path']}: {p['message']}")
        if len(inv["problems"]) > max_problems:
            lines.append(f"  … and {len(inv['problems']) - max_problems} more (use --json for all)")
    else:
        lines.append("No problems found.")
    return "\n".join(lines)
