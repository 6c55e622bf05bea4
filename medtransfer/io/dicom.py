"""DICOM image → float array in physical units, with the metadata downstream code needs.

Conventions (kept by every reader in :mod:`medtransfer.io`):

* ``array`` is ``float32`` in physical units: the Modality LUT (RescaleSlope/Intercept, per frame for
  enhanced multi-frame objects, or a Modality LUT Sequence) is applied, so CT comes out in
  Hounsfield units. BitsStored and PixelRepresentation are respected (high bits masked, sign
  extended).
* Higher values are always brighter on screen. MONOCHROME1 images (where high stored values are
  displayed dark) are mirrored within their representable range, and so are their window centres;
  ``meta["inverted"]`` records it. Pass ``invert_monochrome1=False`` to keep raw polarity.
* Single-frame grayscale → ``(H, W)``; multi-frame → ``(F, H, W)``; colour → ``(..., H, W, 3)`` RGB
  (YBR and PALETTE COLOR are converted to RGB, values 0–255 for 8-bit data).
* No VOI is applied unless asked (``voi="tags"``, a named window such as ``"lung"`` from
  :data:`medtransfer.io.windows.WINDOWS`, or a ``(center, width)`` pair): then the result is in
  ``[0, 1]`` using the DICOM linear window function (PS3.3 C.11.2.1.2).
* Compressed transfer syntaxes decode through the installed pydicom plugins; where several can,
  the fastest measured one is used (:data:`PREFERRED_DECODERS`). A syntax without a plugin raises
  :class:`MedIOError` naming the package to install.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.errors import MedTransferError
from medtransfer.io.windows import apply_window, percentile_window, window_by_name

logger = logging.getLogger(__name__)


def _pydicom_major() -> int:
    from importlib.metadata import version

    return int(version("pydicom").split(".")[0])


_PYDICOM_MAJOR = _pydicom_major()

# Attributes that identify a person; never copied into metadata, outputs or logs.
PHI_KEYWORDS = frozenset({"PatientName", "PatientBirthDate", "PatientAddress", "OtherPatientNames"})

# Package to install for each compressed transfer syntax (first one is the suggested pip install).
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (GPL-3.0) or Pillow",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (GPL-3.0) or Pillow",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg (GPL-3.0) or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg (GPL-3.0) or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pyjpegls or pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}

# Where several installed plugins decode a syntax, the one measured fastest by
# benchmarks/io_bench.py (pylibjpeg-rle is ~2x pydicom's numpy RLE; openjpeg ≈ Pillow for J2K).
PREFERRED_DECODERS = {
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow"),
    "1.2.840.10008.1.2.4.201": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.202": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.203": ("pylibjpeg",),
}

# Uncompressed syntaxes read straight from the PixelData bytes (little/big endian).
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "<",
    "1.2.840.10008.1.2.1": "<",
    "1.2.840.10008.1.2.1.99": "<",
    "1.2.840.10008.1.2.2": ">",
}


class MedIOError(MedTransferError):
    """A file could not be read as a medical image. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotDicomError(MedIOError):
    """The file is not DICOM at all (a README, a CSV, a viewer program on a DICOM CD): skip, don't fail."""


class NoPixelDataError(MedIOError):
    """A valid DICOM object without an image (SR, RTSTRUCT, PR, KOS, …): skip, don't fail."""


class UndecodablePixelDataError(MedIOError):
    """The header is valid but the pixel data cannot be decoded (missing plugin, corrupt or short data)."""


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
            with warnings.catch_warnings():  # pydicom's guesses about a text file's VR are noise here
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, force=True, stop_before_pixels=stop_before_pixels)
        except Exception:
            raise NotDicomError(p, "not a DICOM file (no DICM preamble, content does not parse)") from None
        if "SOPClassUID" not in ds and "PixelData" not in ds and "Rows" not in ds:
            raise NotDicomError(p, "not a DICOM file (no DICM preamble and no DICOM image attributes)")
        return ds
    except Exception as exc:  # truncated headers, bad lengths
        raise MedIOError(p, f"unreadable DICOM, the file may be truncated ({type(exc).__name__}: {exc})") from None


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
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def _spacing(value: Any) -> list[float] | None:
    """A ``[row, column]`` spacing in mm, or None when absent or not positive (``0\\0`` is common)."""
    if not value:
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == 2 and min(out) > 0 else None


# Header attributes read on every call, parsed straight from the raw bytes (pydicom's value
# conversion and validation cost ~3x more, which dominated read time for small images).
_FAST_TAGS: dict[str, tuple[int, str]] = {
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "SamplesPerPixel": (0x00280002, "US"),
    "BitsAllocated": (0x00280100, "US"), "BitsStored": (0x00280101, "US"), "PixelRepresentation": (0x00280103, "US"),
    "NumberOfFrames": (0x00280008, "IS"), "InstanceNumber": (0x00200013, "IS"),
    "PixelSpacing": (0x00280030, "DS"), "ImagerPixelSpacing": (0x00181164, "DS"),
    "ImagePositionPatient": (0x00200032, "DS"), "ImageOrientationPatient": (0x00200037, "DS"),
    "RescaleSlope": (0x00281053, "DS"), "RescaleIntercept": (0x00281052, "DS"),
    "WindowCenter": (0x00281050, "DS"), "WindowWidth": (0x00281051, "DS"),
    "SOPClassUID": (0x00080016, "UI"), "SOPInstanceUID": (0x00080018, "UI"), "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"), "FrameOfReferenceUID": (0x00200052, "UI"),
    "Modality": (0x00080060, "CS"), "PhotometricInterpretation": (0x00280004, "CS"),
}


def _fget(ds, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` for :data:`_FAST_TAGS`, parsing raw elements directly.

    DS values come back as float (or list of float), IS as int, US as int, UI/CS as str;
    anything unusual falls back to pydicom's own conversion.
    """
    tag, vr = _FAST_TAGS[keyword]
    try:
        elem = ds.get_item(tag)
    except Exception:
        return ds.get(keyword, default)
    if elem is None:
        return default
    if type(elem).__name__ != "RawDataElement":
        value = elem.value
        return default if value is None else value
    raw = elem.value
    if raw is None or len(raw) == 0:
        return ds.get(keyword, default)
    try:
        if vr == "US":
            if len(raw) != 2:
                return ds.get(keyword, default)
            return int.from_bytes(raw, "little" if elem.is_little_endian else "big")
        text = raw.decode("ascii").strip(" \0")
        if vr in ("UI", "CS"):
            return text
        parts = [t.strip() for t in text.split("\\")]
        values = [int(t) for t in parts] if vr == "IS" else [float(t) for t in parts]
    except (UnicodeDecodeError, ValueError):
        return ds.get(keyword, default)
    return values[0] if len(values) == 1 and keyword not in _MULTI else values


_MULTI = {"PixelSpacing", "ImagerPixelSpacing", "ImagePositionPatient", "ImageOrientationPatient"}


def transfer_syntax(ds) -> str:
    """The dataset's transfer syntax UID as a string (``""`` when the file meta lacks it)."""
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


# ---------------------------------------------------------------------------------------------
# Functional groups (enhanced multi-frame objects)


def _fg_item(ds, sequence: str, frame: int | None = None):
    """The first item of ``sequence`` for ``frame`` (per-frame first, then shared), or None."""
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is not None and frame < len(per_frame):
            seq = per_frame[frame].get(sequence)
            if seq:
                return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(sequence)
        if seq:
            return seq[0]
    return None


def _n_frames(ds) -> int:
    try:
        return max(int(_fget(ds, "NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def frame_rescale(ds) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame RescaleSlope and RescaleIntercept, shape ``(F,)`` each.

    Enhanced objects keep them in the Pixel Value Transformation functional group (per frame or
    shared); classic objects in the top-level attributes. Missing values mean slope 1, intercept 0.
    """
    n = _n_frames(ds)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "PerFrameFunctionalGroupsSequence" not in ds:
        slope, intercept = _float(_fget(ds, "RescaleSlope"), 1.0), _float(_fget(ds, "RescaleIntercept"), 0.0)
        return np.full(n, slope), np.full(n, intercept)
    slopes, intercepts = np.ones(n), np.zeros(n)
    for i in range(n):
        item = _fg_item(ds, "PixelValueTransformationSequence", i)
        if item is not None:
            slopes[i] = _float(item.get("RescaleSlope"), 1.0)
            intercepts[i] = _float(item.get("RescaleIntercept"), 0.0)
    return slopes, intercepts


def frame_geometry(ds) -> dict[str, Any]:
    """Geometry of every frame: ``positions`` ``(F, 3)`` (or None), ``orientations`` ``(F, 6)``
    (or None), ``pixel_spacing`` ``[row, column]`` in mm (or None) and ``slice_thickness``.

    Reads ImagePositionPatient/ImageOrientationPatient/PixelSpacing, or for enhanced objects the
    Plane Position, Plane Orientation and Pixel Measures functional groups. Coordinates are DICOM
    patient coordinates (LPS).
    """
    n = _n_frames(ds)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    positions = orientations = None
    spacing = _spacing(ds.get("PixelSpacing")) or _spacing(ds.get("ImagerPixelSpacing"))
    thickness = ds.get("SliceThickness")
    between = ds.get("SpacingBetweenSlices")
    if enhanced and ("ImagePositionPatient" not in ds or n > 1):
        pos, ori = [], []
        for i in range(n):
            p_item = _fg_item(ds, "PlanePositionSequence", i)
            o_item = _fg_item(ds, "PlaneOrientationSequence", i)
            pos.append(p_item.get("ImagePositionPatient") if p_item is not None else None)
            ori.append(o_item.get("ImageOrientationPatient") if o_item is not None else None)
        if all(p is not None for p in pos):
            positions = np.array([[float(v) for v in p] for p in pos])
        if all(o is not None for o in ori):
            orientations = np.array([[float(v) for v in o] for o in ori])
        measures = _fg_item(ds, "PixelMeasuresSequence", 0)
        if measures is not None:
            spacing = _spacing(measures.get("PixelSpacing")) or spacing
            thickness = measures.get("SliceThickness", thickness)
            between = measures.get("SpacingBetweenSlices", between)
    else:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and len(ipp) == 3:
            positions = np.array([[float(v) for v in ipp]])
        if iop is not None and len(iop) == 6:
            orientations = np.array([[float(v) for v in iop]])
    return {
        "positions": positions,
        "orientations": orientations,
        "pixel_spacing": spacing,
        "slice_thickness": _float(thickness, 0.0) or None,
        "spacing_between_slices": _float(between, 0.0) or None,
    }


# ---------------------------------------------------------------------------------------------
# Pixel data


def _stored_range(ds) -> tuple[int, int]:
    bits = int(_fget(ds, "BitsStored", _fget(ds, "BitsAllocated", 16)))
    if int(_fget(ds, "PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _native_pixels(ds, path: Path, ts: str) -> np.ndarray | None:
    """Uncompressed grayscale pixels straight from the PixelData bytes (None: let pydicom do it).

    Same result as ``ds.pixel_array`` (high bits masked, sign extended), without its per-call
    overhead, and a precise message when the data is shorter than the header promises.
    """
    order = _NATIVE_SYNTAXES.get(ts)
    if order is None or int(_fget(ds, "SamplesPerPixel", 1) or 1) != 1 or "PixelData" not in ds:
        return None
    bits_alloc = int(_fget(ds, "BitsAllocated", 0) or 0)
    if bits_alloc not in (8, 16, 32) or (order == ">" and bits_alloc == 8):
        return None
    raw = ds.PixelData
    if not isinstance(raw, (bytes, bytearray)):
        return None
    rows, cols, frames = int(ds.Rows), int(ds.Columns), _n_frames(ds)
    count = rows * cols * frames
    expected = count * bits_alloc // 8
    if len(raw) < expected:
        raise UndecodablePixelDataError(
            path,
            f"pixel data holds {len(raw)} bytes but {frames} frame(s) of {rows}×{cols} at {bits_alloc} bits "
            f"need {expected}: the file is truncated or Rows/Columns/BitsAllocated are wrong",
        )
    signed = int(_fget(ds, "PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"{order}{'i' if signed else 'u'}{bits_alloc // 8}")
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    if order == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    bits_stored = int(_fget(ds, "BitsStored", bits_alloc) or bits_alloc)
    if bits_stored < bits_alloc and arr.size:
        # Only touch the data when a value lies outside the stored range (overlay bits, unextended
        # signs): a read-only min/max pass is cheaper than always writing a masked copy.
        if signed:
            lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
            if int(arr.min()) < lo or int(arr.max()) > hi:
                shift = bits_alloc - bits_stored
                arr = (arr << shift) >> shift
        elif int(arr.max()) >= (1 << bits_stored):
            arr = arr & arr.dtype.type((1 << bits_stored) - 1)
    return arr.reshape((frames, rows, cols) if frames > 1 else (rows, cols))


@functools.lru_cache(maxsize=None)
def decoder_for(ts: str) -> tuple[str, tuple[str, ...]]:
    """The plugin medtransfer uses for transfer syntax ``ts`` and all installed ones.

    ``("", ())`` for uncompressed syntaxes or when pydicom has no decoder for ``ts``.
    """
    if ts in _NATIVE_SYNTAXES:
        return "", ()
    try:
        from pydicom.pixels import get_decoder

        available = tuple(get_decoder(ts).available_plugins)
    except Exception:
        return "", ()
    for plugin in PREFERRED_DECODERS.get(ts, ()):
        if plugin in available:
            return plugin, available
    return (available[0] if available else ""), available


def decoder_available(ts: str) -> bool:
    """Whether the installed plugins can decode pixel data in transfer syntax ``ts``."""
    if not ts or ts in _NATIVE_SYNTAXES:
        return True
    return bool(decoder_for(ts)[1])


def missing_decoder_hint(ts: str) -> str:
    """``"pip install X"`` advice for a transfer syntax no installed plugin decodes."""
    hint = _DECODER_HINTS.get(ts)
    if not hint:
        return "no pydicom decoder plugin is known for this transfer syntax"
    return f"install a decoder plugin: pip install {hint.split(' ')[0]} (alternatives: {hint})"


def _ts_name(ts: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(ts).name
        return f"{name} ({ts})" if name != ts else ts
    except Exception:  # pragma: no cover
        return ts


def _pixel_array(ds, path: Path) -> np.ndarray:
    ts = transfer_syntax(ds)
    native = _native_pixels(ds, path, ts)
    if native is not None:
        return native
    plugin, available = decoder_for(ts)
    if ts and ts not in _NATIVE_SYNTAXES and not available and ts in _DECODER_HINTS:
        raise UndecodablePixelDataError(
            path, f"cannot decode transfer syntax {_ts_name(ts)}: no installed plugin can; {missing_decoder_hint(ts)}"
        )
    try:
        if plugin:
            from pydicom.pixels import pixel_array

            try:
                return pixel_array(ds, decoding_plugin=plugin)
            except Exception:
                if len(available) < 2:
                    raise
                logger.debug("%s: plugin %s failed, trying the others", path, plugin)
        return ds.pixel_array
    except NotImplementedError as exc:
        raise UndecodablePixelDataError(
            path, f"cannot decode transfer syntax {_ts_name(ts)} ({exc}); {missing_decoder_hint(ts)}"
        ) from None
    except Exception as exc:
        # pydicom says e.g. "The number of bytes of pixel data is less than expected"; a corrupt
        # codestream raises from the plugin.
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if ts in _DECODER_HINTS:
            via = f" via {', '.join(available)}" if available else ""
            raise UndecodablePixelDataError(
                path,
                f"compressed pixel data ({_ts_name(ts)}) cannot be decoded{via}: {detail}. The stream may be "
                f"corrupt; if it is not, another plugin may help: {missing_decoder_hint(ts)}",
            ) from None
        raise UndecodablePixelDataError(path, f"pixel data cannot be decoded: {detail}") from None


def dicom_meta(ds) -> dict[str, Any]:
    """Non-identifying metadata of a dataset (identifiers the user keys on, geometry, encoding)."""
    get = ds.get
    pixel_spacing, imager_spacing = _spacing(_fget(ds, "PixelSpacing")), _spacing(_fget(ds, "ImagerPixelSpacing"))
    spacing = pixel_spacing or imager_spacing
    spacing_source = "PixelSpacing" if pixel_spacing else ("ImagerPixelSpacing" if spacing else None)
    meta: dict[str, Any] = {
        "sop_class_uid": str(_fget(ds, "SOPClassUID", "")),
        "sop_instance_uid": str(_fget(ds, "SOPInstanceUID", "")),
        "study_instance_uid": str(_fget(ds, "StudyInstanceUID", "")),
        "series_instance_uid": str(_fget(ds, "SeriesInstanceUID", "")),
        "frame_of_reference_uid": str(_fget(ds, "FrameOfReferenceUID", "")),
        "patient_id": str(get("PatientID", "")),
        "modality": str(_fget(ds, "Modality", "")),
        "photometric_interpretation": str(_fget(ds, "PhotometricInterpretation", "")),
        "rows": int(_fget(ds, "Rows", 0) or 0),
        "columns": int(_fget(ds, "Columns", 0) or 0),
        "frames": _n_frames(ds),
        "bits_stored": int(_fget(ds, "BitsStored", 0) or 0),
        "pixel_representation": int(_fget(ds, "PixelRepresentation", 0) or 0),
        "pixel_spacing": spacing,
        "pixel_spacing_source": spacing_source,
        "transfer_syntax": transfer_syntax(ds),
        "series_description": str(get("SeriesDescription", "")),
    }
    number = _fget(ds, "InstanceNumber")
    meta["instance_number"] = int(number) if number not in (None, "") else None
    ipp, iop = _fget(ds, "ImagePositionPatient"), _fget(ds, "ImageOrientationPatient")
    meta["image_position"] = [float(v) for v in ipp] if ipp else None
    meta["image_orientation"] = [float(v) for v in iop] if iop else None
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        geom = frame_geometry(ds)
        if meta["pixel_spacing"] is None and geom["pixel_spacing"]:
            meta["pixel_spacing"], meta["pixel_spacing_source"] = geom["pixel_spacing"], "PixelMeasuresSequence"
        if geom["positions"] is not None:
            meta["frame_positions"] = geom["positions"].tolist()
            meta["image_position"] = meta["image_position"] or meta["frame_positions"][0]
        if geom["orientations"] is not None:
            meta["image_orientation"] = meta["image_orientation"] or geom["orientations"][0].tolist()
    return meta


def _window_tags(ds) -> tuple[float | None, float | None]:
    center, width = _first(_fget(ds, "WindowCenter")), _first(_fget(ds, "WindowWidth"))
    if center is None or width is None:
        item = _fg_item(ds, "FrameVOILUTSequence", 0)
        if item is not None:
            center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    center = None if center in (None, "") else _float(center, 0.0)
    width = None if width in (None, "") else _float(width, 0.0)
    return center, width


def _to_rgb(ds, pixels: np.ndarray, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return np.asarray(apply_color_lut(pixels, ds))
    if photometric.startswith("YBR") and _PYDICOM_MAJOR < 3:
        # pydicom 3 converts YBR to RGB while decoding; pydicom 2 leaves it to us.
        from pydicom.pixel_data_handlers.util import convert_color_space

        return convert_color_space(pixels, photometric, "RGB")
    return pixels


def read_dicom(
    path: str | os.PathLike[str],
    *,
    voi: str | tuple[float, float] | None = None,
    invert_monochrome1: bool = True,
) -> ImageData:
    """Read one DICOM file into physical units (see the module docstring for the conventions).

    ``voi``: ``None`` (physical units), ``"tags"`` (the file's first WindowCenter/Width, or its
    VOI LUT Sequence; percentiles 0.5–99.5 when it has neither), a window name from
    :data:`medtransfer.io.windows.WINDOWS` (``"lung"``, ``"bone"``, …) or ``(center, width)``;
    the windowed output is in ``[0, 1]``.

    Raises :class:`NoPixelDataError` for objects without an image and :class:`MedIOError`
    (:class:`UndecodablePixelDataError` for pixel data problems) for every other failure, both
    naming the file and the cause.
    """
    p = Path(path)
    ds = _dcmread(p)
    meta = dicom_meta(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        # A DICOMDIR names its SOP class only in the file meta (Media Storage Directory Storage).
        sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        name = str(getattr(sop, "name", str(sop or "unknown SOP class")))
        if "DirectoryRecordSequence" in ds:
            name = f"DICOMDIR, {name}" if sop else "DICOMDIR"
        if name.endswith("Image Storage") or "Rows" in ds:
            # An image object without its pixels is broken (cut short, or pixels stripped), not skippable.
            raise UndecodablePixelDataError(
                p, f"{name} object has no pixel data: the file is truncated or its pixel data was removed"
            )
        raise NoPixelDataError(p, f"no image in this DICOM object ({name})")
    if not meta["rows"] or not meta["columns"]:
        raise UndecodablePixelDataError(p, "pixel data present but Rows/Columns are missing or zero")
    pixels = _pixel_array(ds, p)
    photometric = meta["photometric_interpretation"]
    samples = int(_fget(ds, "SamplesPerPixel", 1) or 1)

    if samples > 1 or photometric == "PALETTE COLOR":
        array = _to_rgb(ds, pixels, photometric).astype(np.float32)
        top = float(2 ** int(_fget(ds, "BitsStored", 8) or 8) - 1)
        if photometric == "PALETTE COLOR":  # palette LUT entries are 8 or 16 bit, whatever BitsStored says
            top = 65535.0 if float(array.max(initial=0)) > 255 else 255.0
        meta.update(
            inverted=False, window_center=None, window_width=None, rescale_slope=1.0, rescale_intercept=0.0,
            color_space="RGB", value_range=[0.0, top],
        )
        return ImageData(array, meta)

    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        from pydicom.pixels import apply_modality_lut

        array = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        lut = np.asarray(ds.ModalityLUTSequence[0].LUTData, dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        slopes, intercepts = np.ones(1), np.zeros(1)
        meta["modality_lut"] = "ModalityLUTSequence"
        if photometric == "MONOCHROME1" and invert_monochrome1:
            np.subtract(np.float32(lo + hi), array, out=array)
    else:
        slopes, intercepts = frame_rescale(ds)
        lo_s, hi_s = _stored_range(ds)
        ends = np.concatenate([lo_s * slopes + intercepts, hi_s * slopes + intercepts])
        lo, hi = float(ends.min()), float(ends.max())
        invert = photometric == "MONOCHROME1" and invert_monochrome1
        if pixels.ndim == 3 and (np.ptp(slopes) > 0 or np.ptp(intercepts) > 0):
            array = pixels.astype(np.float32)
            array *= slopes.astype(np.float32)[:, None, None]
            array += intercepts.astype(np.float32)[:, None, None]
            if invert:
                np.subtract(np.float32(lo + hi), array, out=array)
            meta["rescale_slopes"], meta["rescale_intercepts"] = slopes.tolist(), intercepts.tolist()
        else:
            # One affine map a·stored + b straight into float32 (rescale and inversion fused).
            a, b = float(slopes[0]), float(intercepts[0])
            if invert:
                a, b = -a, lo + hi - b
            array = np.empty(pixels.shape, dtype=np.float32)
            if a == 1.0:
                np.add(pixels, np.float32(b), out=array, dtype=np.float32)
            elif a == -1.0:
                np.subtract(np.float32(b), pixels, out=array, dtype=np.float32)
            else:
                np.multiply(pixels, np.float32(a), out=array, dtype=np.float32)
                if b != 0.0:
                    array += np.float32(b)
    center, width = _window_tags(ds)

    inverted = False
    if photometric == "MONOCHROME1" and invert_monochrome1:
        if center is not None:
            center = lo + hi - center
        inverted = True
    meta.update(
        inverted=inverted,
        window_center=center,
        window_width=width,
        rescale_slope=float(slopes[0]),
        rescale_intercept=float(intercepts[0]),
        value_range=[lo, hi],
    )

    if voi is None:
        return ImageData(array, meta)
    if isinstance(voi, tuple):
        meta["voi_applied"] = "explicit"
        return ImageData(apply_window(array, *voi), meta)
    if voi != "tags":
        c, w = window_by_name(voi)
        meta["voi_applied"] = f"preset:{voi}"
        return ImageData(apply_window(array, c, w), meta)
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
