"""DICOM SEG → masks on the grid of the referenced source series.

Each SEG frame is placed on the slice of the source :class:`~medtransfer.io.volume.Volume` whose
SOPInstanceUID its Source Image Sequence names; frames without a usable reference are placed by
their Plane Position projected on the slice normal (within half a slice). Read with pydicom;
the result shares the volume's grid, affine and RAS convention.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.io.dicom import MedIOError, _fg_item, _n_frames, _pixel_array, read_dicom_header
from medtransfer.io.volume import Problem, Volume

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Segmentation:
    """Per-segment masks ``(S, X, Y, Z)`` aligned to a source volume, plus segment descriptions.

    ``masks`` is ``uint8`` 0/1 for BINARY SEGs and ``float32`` in ``[0, 1]`` for FRACTIONAL ones;
    ``segments[i]`` describes ``masks[i]`` (``number``, ``label``, ``description``, ``category``, ``type``).
    """

    masks: np.ndarray
    segments: list[dict[str, Any]]
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def label_map(self, threshold: float = 0.5) -> np.ndarray:
        """``(X, Y, Z)`` int16 map of segment numbers (0 = background; on overlap the higher number wins)."""
        out = np.zeros(self.masks.shape[1:], dtype=np.int16)
        for mask, seg in zip(self.masks, self.segments):
            out[mask > threshold if self.masks.dtype != np.uint8 else mask > 0] = seg["number"]
        return out

    def to_volume(self) -> Volume:
        """The label map as a :class:`Volume` (integer labels, same affine as the source)."""
        return Volume(self.label_map(), self.affine.copy(), dict(self.meta), list(self.problems))


def _code_meaning(item, keyword: str) -> str:
    seq = item.get(keyword)
    return str(seq[0].get("CodeMeaning", "")) if seq else ""


def read_seg(
    path: str | os.PathLike[str], reference: Volume | str | os.PathLike[str], *, strict: bool = False
) -> Segmentation:
    """Read a DICOM SEG and align its frames to ``reference`` (a :class:`Volume` from
    :func:`medtransfer.io.read_series`, or the folder of the source series).

    Frames that match no source slice are listed in ``problems`` (``strict=True`` raises instead).
    """
    import pydicom

    p = Path(path)
    if not isinstance(reference, Volume):
        from medtransfer.io.series import read_series

        reference = read_series(reference)
    header = read_dicom_header(p)
    if str(header.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise MedIOError(p, f"not a DICOM SEG (SOP class {header.get('SOPClassUID', 'missing')})")
    ds = pydicom.dcmread(p)
    frames = _pixel_array(ds, p)
    n = _n_frames(ds)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.shape[0] != n:
        raise MedIOError(p, f"NumberOfFrames is {n} but the pixel data holds {frames.shape[0]} frames")

    x, y, z = reference.array.shape[:3]
    if frames.shape[1:] != (y, x):
        raise MedIOError(
            p, f"SEG frames are {frames.shape[1]}×{frames.shape[2]} but the source slices are {y}×{x}; "
            "resampled segmentations are not supported"
        )
    seg_type = str(ds.get("SegmentationType", "BINARY"))
    segments = [
        {
            "number": int(item.SegmentNumber),
            "label": str(item.get("SegmentLabel", "")),
            "description": str(item.get("SegmentDescription", "")),
            "category": _code_meaning(item, "SegmentedPropertyCategoryCodeSequence"),
            "type": _code_meaning(item, "SegmentedPropertyTypeCodeSequence"),
        }
        for item in ds.get("SegmentSequence", [])
    ]
    index_of_segment = {s["number"]: i for i, s in enumerate(segments)}
    if seg_type == "FRACTIONAL":
        scale = float(ds.get("MaximumFractionalValue", 255) or 255)
        masks = np.zeros((len(segments), x, y, z), dtype=np.float32)
    else:
        scale = 1.0
        masks = np.zeros((len(segments), x, y, z), dtype=np.uint8)

    uid_to_k = {uid: k for k, uid in enumerate(reference.meta.get("sop_instance_uids", []))}
    affine_lps = np.asarray(reference.meta.get("affine_lps", np.diag([-1, -1, 1, 1]) @ reference.affine), dtype=float)
    step = affine_lps[:3, 2]
    normal = np.cross(affine_lps[:3, 0], affine_lps[:3, 1])
    normal /= np.linalg.norm(normal) or 1.0
    step_len = float(np.dot(step, normal)) or 1.0
    origin_d = float(np.dot(affine_lps[:3, 3], normal))

    problems: list[Problem] = []
    placed_by = {"uid": 0, "position": 0}
    for f in range(n):
        seg_item = _fg_item(ds, "SegmentIdentificationSequence", f)
        number = int(seg_item.ReferencedSegmentNumber) if seg_item is not None else (segments[0]["number"] if segments else 1)
        if number not in index_of_segment:
            problems.append(Problem("unknown_segment", f"frame {f + 1} refers to segment {number}, not in SegmentSequence", [str(p)]))
            continue
        k = None
        deriv = _fg_item(ds, "DerivationImageSequence", f)
        if deriv is not None:
            for src in deriv.get("SourceImageSequence", []):
                uid = str(src.get("ReferencedSOPInstanceUID", ""))
                if uid in uid_to_k:
                    k = uid_to_k[uid]
                    placed_by["uid"] += 1
                    break
        if k is None:
            pos_item = _fg_item(ds, "PlanePositionSequence", f)
            if pos_item is not None and "ImagePositionPatient" in pos_item:
                d = float(np.dot([float(v) for v in pos_item.ImagePositionPatient], normal))
                k_float = (d - origin_d) / step_len
                k_round = int(round(k_float))
                if abs(k_float - k_round) <= 0.5 and 0 <= k_round < z:
                    k = k_round
                    placed_by["position"] += 1
        if k is None:
            problems.append(Problem(
                "unmatched_frame",
                f"frame {f + 1} (segment {number}) matches no slice of the source series by UID or position",
                [str(p)],
            ))
            continue
        plane = frames[f].T  # (rows, cols) → (X, Y)
        masks[index_of_segment[number], :, :, k] = plane if scale == 1.0 else plane / np.float32(scale)
    if strict and problems:
        raise MedIOError(p, "; ".join(pr.message for pr in problems))
    meta = {
        "source": str(p),
        "segmentation_type": seg_type,
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "referenced_series_instance_uid": reference.meta.get("series_instance_uid"),
        "frames_placed_by_uid": placed_by["uid"],
        "frames_placed_by_position": placed_by["position"],
    }
    return Segmentation(masks, segments, reference.affine.copy(), meta, problems)
