"""DICOM image → float array in physical units, with the metadata downstream code needs.

Conventions (kept by every reader in :mod:`medtransfer.io`):

* ``array`` is ``float32`` in physical units: the Modality LUT (RescaleSlope/Intercept, per frame for
  enhanced multi-frame objects, or a Modality LUT Sequence) is applied, so CT comes out in
  Hounsfield units. BitsStored and PixelRepresentation are respected (high bits masked, sign
  extended).
* Higher values are always brighter on screen. MONOCHROME1 images (where high stored values are
  displayed dark) are mirrored within their representable range ``[lo, hi]`` (``meta["value_range"]``);
  ``meta["inverted"]`` records it and ``meta["window_center"]`` is then the mirrored centre
  ``lo + hi + 1 - center``, the one that windows the inverted array like the file's window. Pass
  ``invert_monochrome1=False`` to keep raw polarity.
* Single-frame grayscale → ``(H, W)``; multi-frame → ``(F, H, W)``; colour → ``(..., H, W, 3)`` RGB
  (YBR and PALETTE COLOR are converted to RGB, values 0–255 for 8-bit data).
* No VOI is applied unless asked (``voi="tags"``, a named window such as ``"lung"`` from
  :data:`medtransfer.io.windows.WINDOWS`, or a ``(center, width)`` pair): then the result is in
  ``[0, 1]``, in the standard's order (PS3.4 N.2): Modality LUT → VOI (the linear window of PS3.3
  C.11.2.1.2 in modality units, or the VOI LUT Sequence) → MONOCHROME1 inversion. VOI does not apply to
  colour images: they come back on ``[0, 1]`` with a warning. ``meta["voi_applied"]`` says what was done.
* Compressed transfer syntaxes decode through the installed pydicom plugins; where several can,
  the fastest measured one is used (:data:`medtransfer.io.decoders.PREFERRED_DECODERS`). A syntax
  without a plugin, or plugins that fail, raise :class:`UndecodablePixelDataError` naming the syntax,
  the bit depth, the plugins tried and the package (and licence) that would decode it.
* Something wrong that could still be read (an invalid NumberOfFrames) is listed in ``meta["problems"]``.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
import warnings
from io import BytesIO
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.errors import MedTransferError
from medtransfer.io.decoders import (  # PREFERRED_DECODERS, decoder_available: still importable from here
    NATIVE_SYNTAXES,
    PLUGINS,
    PREFERRED_DECODERS,  # noqa: F401
    decode_failure_reason,
    decoder_available,  # noqa: F401
    decoder_for,
    missing_decoder_hint,
    plugin_reason,
    syntax_name,
)
from medtransfer.io.volume import Problem
from medtransfer.io.windows import apply_window, percentile_window, window_by_name

logger = logging.getLogger(__name__)


def _pydicom_major() -> int:
    from importlib.metadata import version

    return int(version("pydicom").split(".")[0])


_PYDICOM_MAJOR = _pydicom_major()

# Attributes that identify a person; never copied into metadata, outputs or logs.
PHI_KEYWORDS = frozenset({"PatientName", "PatientBirthDate", "PatientAddress", "OtherPatientNames"})

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


# PixelData longer than this is left in the file by the header read and mapped when it is converted
# (read_dicom), instead of being copied into a bytes object first.
_DEFER_BYTES = 1 << 20


def _dcmread(path: str | os.PathLike[str], stop_before_pixels: bool = False, defer_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise MedIOError(p, f"cannot open file ({exc.strerror})") from None
    if size == 0:
        raise MedIOError(p, "empty file (0 bytes)")
    defer = _DEFER_BYTES if defer_pixels else None
    try:
        return pydicom.dcmread(p, stop_before_pixels=stop_before_pixels, defer_size=defer)
    except InvalidDicomError:
        # Files without the 128-byte preamble are common from old PACS exports; accept them
        # only when the content parses as DICOM.
        try:
            with warnings.catch_warnings():  # pydicom's guesses about a text file's VR are noise here
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, force=True, stop_before_pixels=stop_before_pixels, defer_size=defer)
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


# Explicit VR with a 4-byte value length (PS3.5 7.1.2); the file meta is always explicit VR little endian.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def part10_instance_uid(data: bytes | bytearray | memoryview) -> str | None:
    """The Media Storage SOP Instance UID (0002,0003) of a Part 10 byte string, read from its file meta
    by hand: a few µs, where pydicom's header read takes ~0.15–0.3 ms (it builds the whole file meta).
    PS3.10 7.1 makes it the dataset's SOP Instance UID. ``None`` when the bytes are not Part 10 (no
    ``DICM`` at 128), the file meta ends (or is cut short) before the element, or it is empty."""
    view = memoryview(data)
    if len(view) < 132 or view[128:132] != b"DICM":
        return None
    pos, end = 132, len(view)
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", view, pos)
        if group != 0x0002:
            return None
        vr = bytes(view[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > end:
                return None
            length, value = struct.unpack_from("<I", view, pos + 8)[0], pos + 12
        else:
            length, value = struct.unpack_from("<H", view, pos + 6)[0], pos + 8
        if element == 0x0003:
            uid = bytes(view[value : min(value + length, end)]).rstrip(b"\x00 ").decode("ascii", "replace")
            return uid or None
        pos = value + length
    return None


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" " if vr == b"SH" else b"\x00"
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, implementation_uid: str,
                  implementation_version: str) -> bytes:
    """Preamble, ``DICM`` and the file meta (PS3.10 7.1) of a dataset received as bytes, encoded by hand:
    the bytes pydicom's ``write_file_meta_info`` writes for the same values (tested), without building a
    dataset per instance. Append the dataset's bytes, as received in that transfer syntax."""
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
        _meta_element(0x0012, b"UI", implementation_uid.encode("ascii")),
        _meta_element(0x0013, b"SH", implementation_version.encode("ascii")),
    ])
    return b"\x00" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


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
    "PatientID": (0x00100020, "LO"), "SeriesDescription": (0x0008103E, "LO"),
}


def _fget(ds, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` for :data:`_FAST_TAGS`, parsing raw elements directly.

    DS values come back as float (or list of float), IS as int, US as int, UI/CS as str;
    anything unusual falls back to pydicom's own conversion.
    """
    cache = ds.__dict__.get("_medtransfer_fast")
    if cache is not None:
        if keyword not in cache:
            cache[keyword] = _fget_uncached(ds, keyword, _MISSING)
        value = cache[keyword]
        return default if value is _MISSING else value
    return _fget_uncached(ds, keyword, default)


_MISSING = object()


@contextmanager
def _fast_tag_cache(ds) -> Iterator[None]:
    """Within the block, :func:`_fget` parses each tag of ``ds`` once (read_dicom asks for some ten tags
    several times; the dataset is private to the call, so nothing goes stale)."""
    object.__setattr__(ds, "_medtransfer_fast", {})
    try:
        yield
    finally:
        object.__delattr__(ds, "_medtransfer_fast")


def _fget_uncached(ds, keyword: str, default: Any) -> Any:
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
        if vr == "LO":  # plain ASCII, one value: what pydicom gives; else its own decoding (character sets)
            if b"\\" in raw or b"\x1b" in raw:
                return ds.get(keyword, default)
            return raw.decode("ascii").rstrip("\0 ")
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
    """NumberOfFrames, 1 when absent or invalid (read_dicom first replaces an invalid value by the frames
    the pixel data holds: :func:`correct_number_of_frames`)."""
    try:
        return max(int(_fget(ds, "NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _classic_rescale(ds) -> tuple[float, float] | None:
    """The top-level RescaleSlope/Intercept (1, 0 when absent); None when the frames carry their own."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "PerFrameFunctionalGroupsSequence" not in ds:
        return _float(_fget(ds, "RescaleSlope"), 1.0), _float(_fget(ds, "RescaleIntercept"), 0.0)
    return None


def frame_rescale(ds) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame RescaleSlope and RescaleIntercept, shape ``(F,)`` each.

    Enhanced objects keep them in the Pixel Value Transformation functional group (per frame or
    shared); classic objects in the top-level attributes. Missing values mean slope 1, intercept 0.
    """
    n = _n_frames(ds)
    classic = _classic_rescale(ds)
    if classic is not None:
        return np.full(n, classic[0]), np.full(n, classic[1])
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


_PIXEL_DATA_TAG = 0x7FE00010
_NUMBER_OF_FRAMES_TAG = 0x00280008


def _deferred_pixel_element(ds):
    """The PixelData element while its value is still in the file (deferred read), else None."""
    try:
        elem = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    except TypeError:  # pydicom < 3 has no keep_deferred
        return None
    if elem is None or getattr(elem, "value", b"") is not None or getattr(elem, "value_tell", None) is None:
        return None
    return elem


def _pixel_data_length(ds) -> int | None:
    """Bytes of native PixelData, without reading a deferred value; None when absent or encapsulated."""
    elem = _deferred_pixel_element(ds)
    if elem is not None:
        return None if elem.length == 0xFFFFFFFF else int(elem.length)
    raw = _pixel_bytes(ds)
    return len(raw) if isinstance(raw, (bytes, bytearray)) and transfer_syntax(ds) in NATIVE_SYNTAXES else None


def _pixel_bytes(ds):
    """The PixelData value as read, without pydicom's element conversion (~70 µs per 512×512 slice)."""
    elem = ds.get_item(_PIXEL_DATA_TAG)
    value = getattr(elem, "value", None)
    return value if isinstance(value, (bytes, bytearray)) else ds.get("PixelData")


def _native_buffer(ds, path: Path, ts: str):
    """The native PixelData bytes: mapped from the file when the header read left them there (no copy),
    otherwise the value pydicom read. Deflated files are always read by pydicom (the offset is in the
    inflated stream)."""
    elem = _deferred_pixel_element(ds)
    if elem is None or ts == "1.2.840.10008.1.2.1.99":
        return _pixel_bytes(ds)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    start = int(elem.value_tell)
    return memoryview(mapped)[start : min(start + int(elem.length), len(mapped))]


def _frames_held(ds) -> tuple[int, int, int] | None:
    """``(frames, frame bytes, leftover bytes)`` the native pixel data holds (None when unknown)."""
    length = _pixel_data_length(ds)
    rows, cols = int(_fget(ds, "Rows", 0) or 0), int(_fget(ds, "Columns", 0) or 0)
    bits = int(_fget(ds, "BitsAllocated", 0) or 0) * int(_fget(ds, "SamplesPerPixel", 1) or 1)
    if length is None or not rows or not cols or not bits:
        return None
    frame_bits = rows * cols * bits
    frames = length * 8 // frame_bits
    return frames, frame_bits // 8, (length * 8 - frames * frame_bits) // 8


def _encapsulated_frames(ds) -> int | None:
    """Frames in encapsulated pixel data: the Basic Offset Table entries, else one per fragment."""
    try:
        from pydicom.encaps import parse_basic_offsets, parse_fragments

        buffer = BytesIO(ds.PixelData)
        offsets = parse_basic_offsets(buffer)
        return len(offsets) if offsets else parse_fragments(buffer)[0]
    except Exception:  # pydicom < 3, or a broken item structure
        return None


def _raw_text(ds, tag: int) -> str | None:
    """An element's value as text, without pydicom's value conversion (and its warnings)."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    return None if value is None else str(value)


def correct_number_of_frames(ds, path: str | os.PathLike[str]) -> Problem | None:
    """Replace an invalid NumberOfFrames ("1A", "0", "") in ``ds`` by the frames its pixel data holds.

    ``ds`` must hold the pixel data (read by :func:`read_dicom`, possibly deferred). Returns the
    ``invalid_number_of_frames`` problem that says what was read, or None when the value is valid or
    absent. Raises :class:`UndecodablePixelDataError` when not even one frame is there.
    """
    text = _raw_text(ds, _NUMBER_OF_FRAMES_TAG)
    if text is None:
        return None
    try:
        if int(text) >= 1:
            return None
    except ValueError:
        pass
    what = f"NumberOfFrames {text!r} is not a whole number ≥ 1"
    held = _frames_held(ds)
    if held is not None:
        frames, frame_bytes, leftover = held
        if frames == 0:
            raise UndecodablePixelDataError(path, f"{what}, and the pixel data is shorter than one frame ({frame_bytes} bytes)")
        message = (f"{what}; read {frames} frame(s), as many as the {frames * frame_bytes + leftover} bytes of pixel "
                   f"data hold ({frame_bytes} bytes per frame)")
        if leftover > 1:  # one byte is the padding to an even length
            message += f"; {leftover} byte(s) left over (not a whole frame) were ignored"
    else:
        frames = _encapsulated_frames(ds) or 1
        message = f"{what}; read {frames} frame(s), one per compressed frame of the pixel data"
    del ds[_NUMBER_OF_FRAMES_TAG]  # dropped unconverted: converting it makes pydicom warn again
    ds.NumberOfFrames = frames
    logger.warning("%s: %s", path, message)
    return Problem("invalid_number_of_frames", message, [str(path)])


def checked_frame_count(path: str | os.PathLike[str], header) -> tuple[int, Problem | None]:
    """Frames of the image at ``path`` whose header (without pixels) is ``header``: NumberOfFrames, or when
    that is invalid the frames its pixel data holds, with the problem (see :func:`correct_number_of_frames`)."""
    text = _raw_text(header, _NUMBER_OF_FRAMES_TAG)
    if text is None:
        return 1, None
    try:
        if int(text) >= 1:
            return int(text), None
    except ValueError:
        pass
    ds = _dcmread(path, defer_pixels=True)
    try:
        problem = correct_number_of_frames(ds, path)
    except UndecodablePixelDataError as exc:
        return 1, Problem("invalid_number_of_frames", exc.reason, [str(path)])
    return _n_frames(ds), problem


def _native_pixels(ds, path: Path, ts: str) -> np.ndarray | None:
    """Uncompressed grayscale stored values straight from the PixelData bytes (None: let pydicom do it).

    Same values as ``ds.pixel_array`` (high bits masked, sign extended) without its per-call overhead, and
    a precise message when the data is shorter than the header promises. The array may be a read-only
    view of the file (mapped): convert it, don't keep it.
    """
    order = NATIVE_SYNTAXES.get(ts)
    if order is None or int(_fget(ds, "SamplesPerPixel", 1) or 1) != 1 or "PixelData" not in ds:
        return None
    bits_alloc = int(_fget(ds, "BitsAllocated", 0) or 0)
    if bits_alloc not in (8, 16, 32) or (order == ">" and bits_alloc == 8):
        return None
    rows, cols, frames = int(_fget(ds, "Rows")), int(_fget(ds, "Columns")), _n_frames(ds)
    count = rows * cols * frames
    expected = count * bits_alloc // 8
    length = _pixel_data_length(ds)
    if length is not None and length < expected:
        raise UndecodablePixelDataError(
            path,
            f"pixel data holds {length} bytes but {frames} frame(s) of {rows}×{cols} at {bits_alloc} bits "
            f"need {expected}: the file is truncated or Rows/Columns/BitsAllocated are wrong",
        )
    raw = _native_buffer(ds, path, ts)
    if len(raw) < expected:  # the file ends before the element does
        raise UndecodablePixelDataError(path, f"pixel data cut short: {len(raw)} of {expected} bytes in the file; it is truncated")
    signed = int(_fget(ds, "PixelRepresentation", 0) or 0) == 1
    dtype = np.dtype(f"{order}{'i' if signed else 'u'}{bits_alloc // 8}")
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    bits_stored = int(_fget(ds, "BitsStored", bits_alloc) or bits_alloc)
    if bits_stored < bits_alloc and arr.size:
        arr = _mask_unused_bits(arr, bits_alloc, bits_stored, signed)
    return arr.reshape((frames, rows, cols) if frames > 1 else (rows, cols))


def _mask_unused_bits(arr: np.ndarray, bits_alloc: int, bits_stored: int, signed: bool) -> np.ndarray:
    """Clear the bits above BitsStored (overlays, garbage) and extend the sign of signed values.

    Only touches the data when a value lies outside the stored range: a read-only min/max pass is
    cheaper than always writing a masked copy.
    """
    if signed:
        lo, hi = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
        if int(arr.min()) < lo or int(arr.max()) > hi:
            shift = bits_alloc - bits_stored
            return (arr.astype(arr.dtype.newbyteorder("=")) << shift) >> shift
    elif int(arr.max()) >= (1 << bits_stored):
        return arr & arr.dtype.type((1 << bits_stored) - 1)
    return arr


def _decode_with_plugins(ds, path: Path, ts: str) -> np.ndarray:
    """Compressed pixel data through the installed pydicom plugins, the preferred one first; when all
    fail, the message names the syntax, the bit depth, each plugin's reason and what would work."""
    from pydicom.pixels import pixel_array

    first, available = decoder_for(ts)
    bits = int(_fget(ds, "BitsStored", 0) or 0)
    if not available:
        raise UndecodablePixelDataError(
            path, f"cannot decode {syntax_name(ts)}, {bits}-bit samples: no installed plugin can; "
            f"{missing_decoder_hint(ts, bits)}"
        )
    failures: dict[str, str] = {}
    for plugin in (first, *(p for p in available if p != first)):
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except Exception as exc:
            failures[plugin] = plugin_reason(exc)
            logger.debug("%s: plugin %s failed: %s", path, plugin, exc)
    raise UndecodablePixelDataError(path, decode_failure_reason(ts, bits, failures))


def _pixel_array(ds, path: Path) -> np.ndarray:
    """Stored pixel values of every frame (uncompressed: possibly a read-only view of the file)."""
    ts = transfer_syntax(ds)
    native = _native_pixels(ds, path, ts)
    if native is not None:
        return native
    if ts in PLUGINS and _PYDICOM_MAJOR >= 3:
        return _decode_with_plugins(ds, path, ts)
    try:
        return ds.pixel_array
    except Exception as exc:
        # pydicom says e.g. "The number of bytes of pixel data is less than expected"
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise UndecodablePixelDataError(path, f"pixel data cannot be decoded: {detail}") from None


def dicom_meta(ds) -> dict[str, Any]:
    """Non-identifying metadata of a dataset (identifiers the user keys on, geometry, encoding)."""
    pixel_spacing, imager_spacing = _spacing(_fget(ds, "PixelSpacing")), _spacing(_fget(ds, "ImagerPixelSpacing"))
    spacing = pixel_spacing or imager_spacing
    spacing_source = "PixelSpacing" if pixel_spacing else ("ImagerPixelSpacing" if spacing else None)
    meta: dict[str, Any] = {
        "sop_class_uid": str(_fget(ds, "SOPClassUID", "")),
        "sop_instance_uid": str(_fget(ds, "SOPInstanceUID", "")),
        "study_instance_uid": str(_fget(ds, "StudyInstanceUID", "")),
        "series_instance_uid": str(_fget(ds, "SeriesInstanceUID", "")),
        "frame_of_reference_uid": str(_fget(ds, "FrameOfReferenceUID", "")),
        "patient_id": str(_fget(ds, "PatientID", "")),
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
        "series_description": str(_fget(ds, "SeriesDescription", "")),
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


def _colour_image(ds, pixels: np.ndarray, meta: dict[str, Any], voi: Any, path: Path) -> ImageData:
    """RGB (YBR and PALETTE COLOR converted), 0…top as stored; on [0, 1] when a VOI was asked for, which
    does not apply to colour (PS3.4 N.2: VOI is a grayscale transformation), with a warning saying so."""
    photometric = meta["photometric_interpretation"]
    array = _to_rgb(ds, pixels, photometric).astype(np.float32)
    top = float(2 ** int(_fget(ds, "BitsStored", 8) or 8) - 1)
    if photometric == "PALETTE COLOR":  # palette LUT entries are 8 or 16 bit, whatever BitsStored says
        top = 65535.0 if float(array.max(initial=0)) > 255 else 255.0
    meta.update(
        inverted=False, window_center=None, window_width=None, rescale_slope=1.0, rescale_intercept=0.0,
        color_space="RGB", value_range=[0.0, top],
    )
    if voi is not None:
        warnings.warn(
            f"{path.name}: VOI ({voi!r}) does not apply to colour images ({photometric}); returned the colour "
            f"values scaled to [0, 1] (divided by {top:g})",
            UserWarning, stacklevel=3,
        )
        array /= np.float32(top)
        meta.update(value_range=[0.0, 1.0], voi_applied="none: VOI does not apply to colour images")
    return ImageData(array, meta)


@dataclass
class _Modality:
    """Stored value → modality value: per-frame ``slopes``/``intercepts`` ``(F,)`` or a Modality LUT
    Sequence (``lut``, applied by pydicom), and ``[lo, hi]``, the modality values of the stored range."""

    slopes: np.ndarray
    intercepts: np.ndarray
    lo: float
    hi: float
    lut: bool = False
    per_frame: bool = False  # frames differ in slope or intercept


def _lut_data(ds, item, entries: int) -> np.ndarray:
    """LUT Data of a Modality or VOI LUT item: a list of values (US) or 16-bit words (OW)."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        order = ">" if transfer_syntax(ds) == "1.2.840.10008.1.2.2" else "<"
        return np.frombuffer(data, dtype=f"{order}u2", count=min(entries, len(data) // 2))
    return np.atleast_1d(np.asarray(data))


def _modality_transform(ds) -> _Modality:
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        item = ds.ModalityLUTSequence[0]
        lut = _lut_data(ds, item, int(item.LUTDescriptor[0]) or 65536).astype(np.float64)
        return _Modality(np.ones(1), np.zeros(1), float(lut.min()), float(lut.max()), lut=True)
    lo_s, hi_s = _stored_range(ds)
    classic = _classic_rescale(ds)
    if classic is not None:  # one slope and intercept for every frame
        slope, intercept = classic
        lo, hi = sorted((lo_s * slope + intercept, hi_s * slope + intercept))
        return _Modality(np.array([slope]), np.array([intercept]), lo, hi)
    slopes, intercepts = frame_rescale(ds)
    ends = np.concatenate([lo_s * slopes + intercepts, hi_s * slopes + intercepts])
    per_frame = bool(np.ptp(slopes) > 0 or np.ptp(intercepts) > 0)
    return _Modality(slopes, intercepts, float(ends.min()), float(ends.max()), per_frame=per_frame)


def _affine_float32(stored: np.ndarray, scale: Any, offset: Any) -> np.ndarray:
    """``scale * stored + offset`` as a new float32 array (float32 arithmetic throughout).

    ``scale`` and ``offset`` are numbers, or ``(F,)`` per-frame values for ``(F, H, W)`` data. A plain
    cast, then in-place float32 arithmetic: numpy vectorises both, whereas a mixed-type ufunc with
    ``out=`` runs its buffered casting loop (2.2× slower on a 1955×1841 uint16 CR, 1.1–1.3× on CT).
    """
    out = stored.astype(np.float32)
    if np.ndim(scale) or np.ndim(offset):
        shape = (-1,) + (1,) * (stored.ndim - 1)
        out *= np.asarray(scale, dtype=np.float32).reshape(shape)
        out += np.asarray(offset, dtype=np.float32).reshape(shape)
    elif scale == -1.0:
        np.subtract(np.float32(offset), out, out=out)
    else:
        if scale != 1.0:
            out *= np.float32(scale)
        if offset != 0.0:
            out += np.float32(offset)
    return out


def _rescale_terms(modality: _Modality) -> tuple[Any, Any]:
    if modality.per_frame:
        return modality.slopes, modality.intercepts
    return float(modality.slopes[0]), float(modality.intercepts[0])


def _physical(ds, stored: np.ndarray, modality: _Modality, invert: bool) -> np.ndarray:
    """Modality values in float32; MONOCHROME1 mirrored within ``[lo, hi]`` when ``invert``."""
    if modality.lut:
        from pydicom.pixels import apply_modality_lut

        array = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
        if invert:
            np.subtract(np.float32(modality.lo + modality.hi), array, out=array)
        return array
    slope, intercept = _rescale_terms(modality)
    if invert:  # lo + hi - (slope * x + intercept), fused into one affine map
        slope, intercept = -np.asarray(slope), modality.lo + modality.hi - np.asarray(intercept)
        if not modality.per_frame:
            slope, intercept = float(slope), float(intercept)
    return _affine_float32(stored, slope, intercept)


def _modality_values(ds, stored: np.ndarray, modality: _Modality) -> np.ndarray:
    """Modality values in float64 (the input of the VOI stage: window or VOI LUT)."""
    if modality.lut:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    shape = (-1,) + (1,) * (stored.ndim - 1) if modality.per_frame else ()
    slope, intercept = _rescale_terms(modality)
    return stored * np.reshape(slope, shape) + np.reshape(intercept, shape)


def _voi_lut(ds, modality_values: np.ndarray, invert: bool) -> np.ndarray:
    """The first VOI LUT Sequence item on the modality values, on [0, 1] by the LUT's nominal output range
    (2^bits − 1, PS3.3 C.11.2.1.1); input below the first mapped value takes the first entry, above the
    last the last entry; then the MONOCHROME1 inversion."""
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    lut = _lut_data(ds, item, entries)
    index = np.clip(np.floor(modality_values).astype(np.int64) - first, 0, len(lut) - 1)  # integer LUT input
    out = lut.astype(np.float32)[index] / np.float32(2**bits - 1)
    return np.subtract(np.float32(1.0), out, out=out) if invert else out


def _voi_choice(voi: Any, tags: tuple[float | None, float | None]) -> tuple[str, tuple[float, float] | None]:
    """Which VOI to apply: ``("explicit" | "preset:NAME" | "window_tags", (center, width))``, or
    ``("voi_lut_sequence" | "percentile", None)`` decided by the caller from the dataset."""
    if isinstance(voi, tuple):
        return "explicit", (float(voi[0]), float(voi[1]))
    if voi != "tags":
        return f"preset:{voi}", window_by_name(voi)
    center, width = tags
    if center is not None and width is not None and width > 0:
        return "window_tags", (center, width)
    return "lookup", None


def _grayscale_image(ds, stored: np.ndarray, meta: dict[str, Any], voi: Any, invert: bool) -> ImageData:
    """Modality LUT → VOI (window, VOI LUT or percentiles) → MONOCHROME1 inversion (PS3.4 N.2)."""
    modality = _modality_transform(ds)
    center, width = _window_tags(ds)
    meta.update(
        inverted=invert, window_center=center, window_width=width,
        rescale_slope=float(modality.slopes[0]), rescale_intercept=float(modality.intercepts[0]),
        value_range=[modality.lo, modality.hi],
    )
    if invert and center is not None:
        # the window that gives the same display on the inverted array: 1 - f(x; c) = f(lo + hi - x; lo + hi + 1 - c)
        meta["window_center"] = modality.lo + modality.hi + 1.0 - center
    if modality.lut:
        meta["modality_lut"] = "ModalityLUTSequence"
    if modality.per_frame:
        meta["rescale_slopes"], meta["rescale_intercepts"] = modality.slopes.tolist(), modality.intercepts.tolist()
    if voi is None:
        return ImageData(_physical(ds, stored, modality, invert), meta)
    how, window = _voi_choice(voi, (center, width))
    if window is not None:
        meta.update(voi_applied=how, voi_window=list(window))
        return ImageData(apply_window(_modality_values(ds, stored, modality), *window, invert=invert), meta)
    if "VOILUTSequence" in ds:
        meta["voi_applied"] = "voi_lut_sequence"
        return ImageData(_voi_lut(ds, _modality_values(ds, stored, modality), invert), meta)
    meta["voi_applied"] = "percentile"
    return ImageData(percentile_window(_physical(ds, stored, modality, invert)), meta)


def _require_pixel_data(ds, meta: dict[str, Any], path: Path) -> None:
    """Raise :class:`NoPixelDataError` for objects without an image and :class:`UndecodablePixelDataError`
    for image objects whose pixels are missing or unusable."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        # A DICOMDIR names its SOP class only in the file meta (Media Storage Directory Storage).
        sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        name = str(getattr(sop, "name", str(sop or "unknown SOP class")))
        if "DirectoryRecordSequence" in ds:
            name = f"DICOMDIR, {name}" if sop else "DICOMDIR"
        if name.endswith("Image Storage") or "Rows" in ds:
            # An image object without its pixels is broken (cut short, or pixels stripped), not skippable.
            raise UndecodablePixelDataError(
                path, f"{name} object has no pixel data: the file is truncated or its pixel data was removed"
            )
        raise NoPixelDataError(path, f"no image in this DICOM object ({name})")
    if not meta["rows"] or not meta["columns"]:
        raise UndecodablePixelDataError(path, "pixel data present but Rows/Columns are missing or zero")


def read_dicom(
    path: str | os.PathLike[str],
    *,
    voi: str | tuple[float, float] | None = None,
    invert_monochrome1: bool = True,
) -> ImageData:
    """Read one DICOM file into physical units (see the module docstring for the conventions).

    ``voi``: ``None`` (physical units), ``"tags"`` (the file's first WindowCenter/Width, or its
    VOI LUT Sequence; percentiles 0.5–99.5 when it has neither), a window name from
    :data:`medtransfer.io.windows.WINDOWS` (``"lung"``, ``"bone"``, …) or ``(center, width)``, always in
    modality units (the window applies before the MONOCHROME1 inversion); the windowed output is in
    ``[0, 1]``. Colour images are not windowed: with a ``voi`` they come back on ``[0, 1]`` with a warning.

    ``meta["problems"]`` lists what was wrong but could be read (an invalid NumberOfFrames). Raises
    :class:`NoPixelDataError` for objects without an image and :class:`MedIOError`
    (:class:`UndecodablePixelDataError` for pixel data problems) for every other failure, both
    naming the file and the cause.
    """
    p = Path(path)
    ds = _dcmread(p, defer_pixels=True)
    problems = [] if "PixelData" not in ds else [x for x in [correct_number_of_frames(ds, p)] if x is not None]
    with _fast_tag_cache(ds):
        meta = dicom_meta(ds)
        meta["problems"] = [x.to_dict() for x in problems]
        _require_pixel_data(ds, meta, p)
        pixels = _pixel_array(ds, p)
        samples = int(_fget(ds, "SamplesPerPixel", 1) or 1)
        if samples > 1 or meta["photometric_interpretation"] == "PALETTE COLOR":
            return _colour_image(ds, pixels, meta, voi, p)
        invert = meta["photometric_interpretation"] == "MONOCHROME1" and invert_monochrome1
        return _grayscale_image(ds, pixels, meta, voi, invert)
