"""DICOM image → float array in physical units, with the metadata downstream code needs.

Conventions (kept by every reader in :mod:`medtransfer.io`):

* ``array`` is ``float32`` in physical units: the Modality LUT (RescaleSlope/Intercept or a
  Modality LUT Sequence) is applied, so CT comes out in Hounsfield units.
* Higher values are always brighter on screen. MONOCHROME1 images (where high stored values are
  displayed dark) are mirrored within their representable range, and so are their window centres;
  ``meta["inverted"]`` records it. Pass ``invert_monochrome1=False`` to keep raw polarity.
* Single-frame grayscale → ``(H, W)``; multi-frame → ``(F, H, W)``; colour → ``(..., H, W, 3)`` RGB.
* No VOI is applied unless asked (``voi="tags"`` or a ``(center, width)`` pair): then the result is
  in ``[0, 1]`` using the DICOM linear window function (PS3.3 C.11.2.1.2).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.errors import MedTransferError

logger = logging.getLogger(__name__)


def _pydicom_major() -> int:
    from importlib.metadata import version

    return int(version("pydicom").split(".")[0])


_PYDICOM_MAJOR = _pydicom_major()

# Attributes that identify a person; never copied into metadata, outputs or logs.
PHI_KEYWORDS = frozenset({"PatientName", "PatientBirthDate", "PatientAddress", "OtherPatientNames"})

_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (GPL-3.0) or Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (GPL-3.0) or Pillow",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg (GPL-3.0)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg (GPL-3.0)",
    "1.2.840.10008.1.2.4.80": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


class MedIOError(MedTransferError):
    """A file could not be read as a medical image. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NoPixelDataError(MedIOError):
    """A valid DICOM object without an image (SR, RTSTRUCT, PR, KOS, …): skip, don't fail."""


@dataclass
class ImageData:
    """A decoded image and its metadata (no patient names or birth dates)."""

    array: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _dcmread(path: str | os.PathLike[str], stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise MedIOError(p, f"cannot open file ({exc.strerror})") from None
    if size == 0:
        raise MedIOError(p, "empty file (0 bytes)")
    try:
        return pydicom.dcmread(p, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # Files without the 128-byte preamble are common from old PACS exports; accept them
        # only when the content parses as DICOM.
        try:
            ds = pydicom.dcmread(p, force=True, stop_before_pixels=stop_before_pixels)
        except Exception:
            raise MedIOError(p, "not a DICOM file (no DICM preamble, content does not parse)") from None
        if "SOPClassUID" not in ds and "PixelData" not in ds and "Rows" not in ds:
            raise MedIOError(p, "not a DICOM file (no DICM preamble and no DICOM image attributes)")
        return ds
    except Exception as exc:  # truncated headers, bad lengths
        raise MedIOError(p, f"unreadable DICOM ({type(exc).__name__}: {exc})") from None


def read_dicom_header(path: str | os.PathLike[str]):
    """Read a DICOM dataset without its pixel data; raises :class:`MedIOError` on bad files."""
    return _dcmread(path, stop_before_pixels=True)


def _float(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _first(value: Any) -> Any:
    """First item of a multi-valued DICOM element (WindowCenter may hold several windows)."""
    if value is None:
        return None
    try:
        from pydicom.multival import MultiValue

        if isinstance(value, (MultiValue, list, tuple)):
            return value[0] if len(value) else None
    except ImportError:  # pragma: no cover
        pass
    return value


def _modality_lut(ds, pixels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Apply RescaleSlope/Intercept or a Modality LUT Sequence; returns (array, slope, intercept)."""
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32), 1.0, 0.0
    slope = _float(ds.get("RescaleSlope"), 1.0)
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    out = pixels.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out, slope, intercept


def _stored_range(ds) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def apply_window(array: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI function (PS3.3 C.11.2.1.2.1) mapped to ``[0, 1]``."""
    width = max(float(width), 1.0)
    lo = center - 0.5 - (width - 1) / 2
    out = (array.astype(np.float32) - np.float32(lo)) / np.float32(width - 1)
    return np.clip(out, 0.0, 1.0)


def _pixel_array(ds, path: Path) -> np.ndarray:
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        return ds.pixel_array
    except NotImplementedError as exc:
        hint = _DECODER_HINTS.get(ts)
        fix = f" Install a decoder plugin: pip install {hint.split(' ')[0]}" if hint else ""
        raise MedIOError(path, f"cannot decode transfer syntax {ts} ({exc}).{fix}") from None
    except ValueError as exc:
        # pydicom says e.g. "The length of the pixel data in the dataset (N bytes) doesn't match
        # the expected length (M bytes)".
        raise MedIOError(path, f"pixel data cannot be decoded: {exc}") from None
    except Exception as exc:
        hint = _DECODER_HINTS.get(ts)
        extra = f" (compressed with {ts}; decoder: {hint})" if hint else ""
        raise MedIOError(path, f"pixel data cannot be decoded{extra}: {type(exc).__name__}: {exc}") from None


def dicom_meta(ds) -> dict[str, Any]:
    """Non-identifying metadata of a dataset (identifiers the user keys on, geometry, encoding)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    meta: dict[str, Any] = {
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "pixel_spacing": [float(v) for v in spacing] if spacing else None,
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "")),
    }
    return meta


def read_dicom(
    path: str | os.PathLike[str],
    *,
    voi: str | tuple[float, float] | None = None,
    invert_monochrome1: bool = True,
) -> ImageData:
    """Read one DICOM file into physical units (see the module docstring for the conventions).

    ``voi``: ``None`` (physical units), ``"tags"`` (the file's first WindowCenter/Width, or its
    VOI LUT Sequence; percentiles 0.5–99.5 when it has neither) or ``(center, width)``; the
    windowed output is in ``[0, 1]``.

    Raises :class:`NoPixelDataError` for objects without an image and :class:`MedIOError`
    for every other failure, both naming the file and the cause.
    """
    p = Path(path)
    ds = _dcmread(p)
    meta = dicom_meta(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        name = getattr(sop, "name", str(sop or "unknown SOP class"))
        raise NoPixelDataError(p, f"no image in this DICOM object ({name})")
    pixels = _pixel_array(ds, p)
    photometric = meta["photometric_interpretation"]
    samples = int(ds.get("SamplesPerPixel", 1) or 1)

    if samples > 1:
        if photometric.startswith("YBR") and _PYDICOM_MAJOR < 3:
            # pydicom 3 converts YBR to RGB while decoding; pydicom 2 leaves it to us.
            from pydicom.pixel_data_handlers.util import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        array = pixels.astype(np.float32)
        meta.update(inverted=False, window_center=None, window_width=None, rescale_slope=1.0, rescale_intercept=0.0)
        return ImageData(array, meta)

    array, slope, intercept = _modality_lut(ds, pixels)
    lo_s, hi_s = _stored_range(ds)
    lo, hi = sorted((lo_s * slope + intercept, hi_s * slope + intercept))
    center = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    center = None if center is None else float(center)
    width = None if width is None else float(width)

    inverted = False
    if photometric == "MONOCHROME1" and invert_monochrome1:
        array = np.float32(lo + hi) - array
        if center is not None:
            center = lo + hi - center
        inverted = True
    meta.update(
        inverted=inverted,
        window_center=center,
        window_width=width,
        rescale_slope=slope,
        rescale_intercept=intercept,
        value_range=[float(lo), float(hi)],
    )

    if voi is None:
        return ImageData(array, meta)
    if isinstance(voi, tuple):
        return ImageData(apply_window(array, *voi), meta)
    if voi != "tags":
        raise ValueError(f"voi must be None, 'tags' or (center, width); got {voi!r}")
    if center is not None and width is not None and width > 0:
        meta["voi_applied"] = "window_tags"
        return ImageData(apply_window(array, center, width), meta)
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        voi_out = np.asarray(apply_voi_lut(pixels, ds), dtype=np.float32)
        voi_out = (voi_out - voi_out.min()) / max(float(voi_out.max() - voi_out.min()), 1e-6)
        if inverted:
            voi_out = 1.0 - voi_out
        meta["voi_applied"] = "voi_lut_sequence"
        return ImageData(voi_out, meta)
    meta["voi_applied"] = "percentile"
    return ImageData(percentile_window(array), meta)


def percentile_window(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale ``array`` to ``[0, 1]`` between two percentiles (robust to outlier pixels)."""
    a, b = np.percentile(array, [low, high])
    if b <= a:
        return np.zeros_like(array, dtype=np.float32)
    return np.clip((array.astype(np.float32) - np.float32(a)) / np.float32(b - a), 0.0, 1.0)
