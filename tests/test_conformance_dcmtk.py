"""read_dicom against DCMTK 3.6.7 and pydicom's Modality LUT, file for file.

Files: every DICOM file bundled with pydicom (and pydicom-data when it is installed) and every one under
``../shared/data`` (read through ``shared_data``; identical copies counted once, under their first name).
Non-image objects (SR, RT structure sets and plans, SEG, DICOMDIR, header-only objects) must read as "no
image" and are not compared; the files that no installed decoder reads are listed in
:data:`UNDECODABLE` and skipped with their reason (``pytest -rs`` lists them).

For every image object:

* **pydicom** — ``read_dicom(path, invert_monochrome1=False).array`` equals pydicom's
  ``apply_modality_lut(ds.pixel_array[frame], item)`` for every frame, where ``item`` is the dataset or, for
  enhanced multi-frame objects, the frame's Pixel Value Transformation (per-frame group, else shared).
  MONOCHROME1 with the inversion equals ``lo + hi - modality``.
* **DCMTK** — ``dcm2pnm`` (``dcmj2pnm`` for JPEG, ``dcml2pnm`` for JPEG-LS) writes 16-bit PGM/PPM
  (``+opw``, overlays off with ``-O``), compared on [0, 1] within 1/255 with:
  the file's own window (``+Wi 1`` against ``voi="tags"``); one explicit window (``+Ww c w`` against
  ``voi=(c, w)``: from the data, width 10 or width 1, chosen per file); for MONOCHROME1 every kind of
  window, the file's window given explicitly and the raw polarity (``+Pid`` against
  ``invert_monochrome1=False``); colour images as RGB against ``voi="tags"`` (on [0, 1], VOI not applied).
  Multi-frame objects: the first and the last frame.
* **JPEG 2000**: DCMTK 3.6.7 has no JPEG 2000 codec; these files are compared against an uncompressed
  copy written by pydicom after decoding (so DCMTK checks the display pipeline, not the J2K decoder).

Disagreements that are DCMTK's own, with the evidence (asserted in the tests named):

1. DCMTK truncates non-integer rescale output to an integer before the VOI stage. CR1/6154 (slope 0.684,
   intercept 200): stored 1994 is 1563.896; ``+Ww 1564 10`` gives 36408/65535 = 1 - ((1563 - 1563.5) / 9 +
   0.5), i.e. 1563. The standard's rescale output is real-valued, so read_dicom keeps 1563.896. Explicit
   windows on files with a non-integer slope or intercept are therefore at least 512 wide (the truncation
   moves the output by less than 1/511) — ``test_dcmtk_truncates_non_integer_rescale``.
2. DCMTK does not read a window from the Frame VOI LUT functional group of enhanced objects
   (``+Wi 1`` fails on eCT_Supplemental: "VOI windows in file: 0"); read_dicom does. The file's window is
   given to DCMTK with ``+Ww`` instead — ``test_dcmtk_ignores_functional_group_windows``.
3. An invalid NumberOfFrames ("1A", badVR.dcm) makes DCMTK render 1 frame; read_dicom reads the 15 frames
   the data holds (and says so). Only frame 1 is compared there.
4. SC_rgb_jpeg.dcm declares Explicit VR but its data set is encoded Implicit VR; pydicom detects that,
   DCMTK stops ("Non-standard VR '  ' ... while parsing element (0008,0008)"). It is compared against a
   copy pydicom wrote in the declared encoding (still JPEG) — ``test_dcmtk_misreads_mixed_encoding``.
5. DCMTK misreads 32-bit pixel data in Explicit VR Big Endian (rtdose_expb*.dcm): it swaps the OW value
   as 16-bit words, so the stored 0x00130EE8 (1249000) becomes 0x0EE80013; ``dcm2pnm -v -im`` reports
   pixel values 62914575…4292345870 where the little-endian copy of the same dose grid (rtdose_1frame.dcm)
   gives 795000…1254000, pydicom's and read_dicom's values. These files are compared against a copy
   pydicom wrote in Explicit VR Little Endian — ``test_dcmtk_misreads_big_endian_32_bit``.
6. DCMTK applies the Pixel Value Transformation of the shared functional group only: with per-frame
   rescale values (eCT_Supplemental given slope/intercept 1/-1024 and 2/-1000 per frame) it renders the
   stored values (``-im``: pixel values 0…1196); read_dicom applies each frame's own —
   ``test_dcmtk_ignores_per_frame_rescale``.

No bundled or shared file has a VOI LUT Sequence, a Modality LUT Sequence or a narrow MONOCHROME1
window; :data:`SYNTHETIC` builds them from MR_small.dcm and compares them with DCMTK the same way
(``+Wl 1`` for VOI LUTs). DCMTK scales a VOI LUT's output by 2^bits where read_dicom (and the standard's
output range 0…2^bits − 1) uses 2^bits − 1: at most 1/2^bits apart, inside the tolerance for 8 to 16 bits.
"""
from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medtransfer.io import MedIOError, NoPixelDataError, NotDicomError, UndecodablePixelDataError, read_dicom
from medtransfer.io.series import object_kind
from conftest import SHARED_DATA, shared_data

DCM2PNM = shutil.which("dcm2pnm")
needs_dcmtk = pytest.mark.skipif(
    DCM2PNM is None, reason="DCMTK is not installed (Debian: apt-get install dcmtk); dcm2pnm is the reference"
)
TOLERANCE = 1 / 255 + 1e-6  # one 8-bit level, inclusive (DCMTK writes 16-bit values: 1/65535 steps)

# Files no installed decoder reads with the default install, and why. Installing a plugin may shrink the
# list (those files are then compared like the others); a file failing that is not here fails the suite.
UNDECODABLE = {
    "pydicom/test_files/JPEG-lossy.dcm": "12-bit JPEG Extended: Pillow decodes 8-bit only; python-gdcm or "
    "pylibjpeg-libjpeg (GPL-3.0) would (DCMTK's dcmj2pnm does)",
    "pydicom/test_files/JPGExtended.dcm": "12-bit JPEG Extended: as JPEG-lossy.dcm",
    "pydicom/test_files/SC_rgb_jpeg_gdcm.dcm": "JPEG Lossless SV1: no permissive plugin (python-gdcm or "
    "pylibjpeg-libjpeg (GPL-3.0))",
    "pydicom/test_files/JPEG2000-embedded-sequence-delimiter.dcm": "266 bytes of a J2K stream no codec reads "
    "(pydicom's test of an item delimiter inside pixel data)",
    "pydicom/test_files/MR_truncated.dcm": "pixel data cut short (8130 of 8192 bytes): a broken file",
}

_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
# Files DCMTK misreads (disagreements 4 and 5): DCMTK reads a copy pydicom wrote, as declared or in
# little endian.
DCMTK_REWRITE = {
    "pydicom/test_files/SC_rgb_jpeg.dcm": "implicit VR data set under an explicit VR transfer syntax",
    "pydicom/test_files/rtdose_expb.dcm": "32-bit big endian pixel data",
    "pydicom/test_files/rtdose_expb_1frame.dcm": "32-bit big endian pixel data",
}
_NOT_DICOM = {".py", ".pyc", ".json", ".txt", ".md", ".gz", ".nii", ".npz", ".nrrd", ".icc", ".dump", ".csv"}


# ---------------------------------------------------------------------------------------------------------
# The files


def _roots() -> list[tuple[str, Path]]:
    roots = [("pydicom", Path(pydicom.__file__).parent / "data")]
    try:
        import pydicom_data  # noqa: F401  (the optional package of pydicom's larger test files)

        roots.append(("pydicom-data", Path(pydicom_data.__file__).parent / "data"))
    except ImportError:
        pass
    if SHARED_DATA.exists():
        roots.append(("shared", SHARED_DATA))
    return roots


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in _NOT_DICOM or path.name in ("SHA256SUMS", "README") or "__pycache__" in path.parts:
        return False
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() in ("", ".dcm")


@functools.lru_cache(maxsize=None)
def _catalogue() -> dict[str, tuple[str, Path]]:
    """``{id: (kind, path)}`` for every DICOM file, identical content once; kind: image, colour, mono1
    or the reason it is not an image."""
    seen: set[str] = set()
    files: dict[str, tuple[str, Path]] = {}
    for name, root in _roots():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if not _looks_like_dicom(path):
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            files[f"{name}/{path.relative_to(root).as_posix()}"] = (_kind(path), path)
    return files


def _kind(path: Path) -> str:
    """image, mono1, colour, or what the file is instead (the text says what read_dicom must answer)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            has_pixels = "PixelData" in pydicom.dcmread(path, force=True, specific_tags=["PixelData"])
    except Exception as exc:
        return f"not DICOM ({type(exc).__name__})"
    kind = object_kind(ds)
    if kind == "SEG":
        return "segmentation (SEG: masks read by read_seg)"
    if kind not in ("image", "NO_PIXEL_DATA", "OTHER"):
        return f"non-image object ({kind})"
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if not has_pixels and sop is None and "Rows" not in ds:
        return "not DICOM (no DICOM attributes parse)"
    if not has_pixels:
        return "header only (no pixel data)"
    if "Rows" not in ds:
        return "broken image object (pixel data without Rows/Columns)"
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        return "colour"
    return "mono1" if ds.get("PhotometricInterpretation") == "MONOCHROME1" else "image"


def _ids(*kinds: str) -> list[str]:
    chosen = [i for i, (k, _) in _catalogue().items() if k in kinds or (kinds == ("other",) and " (" in k)]
    if not SHARED_DATA.exists():
        chosen.append("shared/(absent)")
    return chosen


def _path(file_id: str) -> Path:
    if file_id.startswith("shared/"):
        shared_data()  # skips with the reason when ../shared/data is absent
        return shared_data(*file_id.split("/")[1:])
    return _catalogue()[file_id][1]


def _decodable(file_id: str) -> Path:
    """The file's path, or a skip naming why no installed decoder reads it (it must be in UNDECODABLE)."""
    path = _path(file_id)
    try:
        _read(path)
    except UndecodablePixelDataError as exc:
        assert file_id in UNDECODABLE, f"{file_id} does not decode and is not listed in UNDECODABLE: {exc.reason}"
        pytest.skip(f"no installed decoder reads {file_id}: {UNDECODABLE[file_id]}")
    return path


@functools.lru_cache(maxsize=64)
def _read(path: Path, voi=None, invert: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the VOI-on-colour warning is tested in test_io_display.py
        return read_dicom(path, voi=voi, invert_monochrome1=invert)


# ---------------------------------------------------------------------------------------------------------
# DCMTK


def _parse_pnm(data: bytes) -> np.ndarray:
    """An ASCII PGM (P2) / PPM (P3) from dcm2pnm ``+opw`` as float64 on [0, 1]."""
    tokens = data.split(maxsplit=4)
    magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    body = tokens[4] if len(tokens) > 4 else b""
    try:  # text-mode fromstring is ~6x faster than split() on a 3.6 M pixel CR
        values = np.fromstring(body, dtype=np.int64, sep=" ").astype(np.float64)
    except (AttributeError, ValueError, DeprecationWarning):
        values = np.array(body.split(), dtype=np.float64)
    shape = (height, width, 3) if magic == b"P3" else (height, width)
    return values.reshape(shape) / maxval


@functools.lru_cache(maxsize=None)
def _dcmtk_source(file_id: str, path: Path, tmp: Path) -> Path:
    """The file DCMTK reads: the file itself; for JPEG 2000 (no codec in DCMTK 3.6.7) an uncompressed copy
    written by pydicom after decoding; for DCMTK_REWRITE a copy pydicom wrote (see disagreements 4, 5)."""
    ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts not in _J2K and file_id not in DCMTK_REWRITE:
        return path
    for _ in ds:  # convert every element with the encoding pydicom detected
        pass
    copy = tmp / (hashlib.sha1(file_id.encode()).hexdigest()[:12] + ".dcm")
    if ts == pydicom.uid.ExplicitVRBigEndian:
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
        pydicom.dcmwrite(copy, ds, implicit_vr=False, little_endian=True, force_encoding=True)
        return copy
    if ts in _J2K:
        ds.decompress()
    ds.save_as(copy)
    return copy


def dcmtk(path: Path, *options: str, frame: int = 0) -> np.ndarray:
    """DCMTK's rendering of one frame on [0, 1] (16-bit PGM, overlays off)."""
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    tool = "dcmj2pnm" if ts in _JPEG else "dcml2pnm" if ts in _JPEG_LS else "dcm2pnm"
    cmd = [shutil.which(tool) or tool, "+opw", "-O", "+F", str(frame + 1), *options, str(path)]
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(cmd)} failed: {done.stderr.decode(errors='replace')}"
    return _parse_pnm(done.stdout)


@pytest.fixture(scope="module")
def dcmtk_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dcmtk")


def _frames(array: np.ndarray, colour: bool) -> list[int]:
    n = array.shape[0] if array.ndim == (4 if colour else 3) else 1
    return sorted({0, n - 1})


def _frame(array: np.ndarray, i: int, colour: bool) -> np.ndarray:
    return array[i] if array.ndim == (4 if colour else 3) else array


def _assert_close(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} vs DCMTK {reference.shape}"
    diff = np.abs(ours.astype(np.float64) - reference)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= TOLERANCE, (
        f"{what}: {int((diff > TOLERANCE).sum())} pixel(s) differ by more than 1/255, worst {diff.max():.4f} at "
        f"{tuple(int(v) for v in worst)} (ours {float(ours[worst]):.4f}, DCMTK {float(reference[worst]):.4f})"
    )


# ---------------------------------------------------------------------------------------------------------
# Windows to check


def _modality_stats(path: Path) -> tuple[np.ndarray, bool]:
    image = _read(path, None, False)
    integral = all(float(v).is_integer() for v in (image.meta.get("rescale_slopes") or [image.meta["rescale_slope"]])) and all(
        float(v).is_integer() for v in (image.meta.get("rescale_intercepts") or [image.meta["rescale_intercept"]])
    )
    return image.array, integral


def _explicit_windows(file_id: str, path: Path, every_kind: bool) -> list[tuple[float, float]]:
    """A window from the data (median, 5th–95th percentile width); width 10 and width 1 around the median
    (integral rescale only: see disagreement 1). One chosen per file, all of them for MONOCHROME1."""
    values, integral = _modality_stats(path)
    median = float(np.round(np.median(values)))
    spread = float(np.round(np.percentile(values, 95) - np.percentile(values, 5)))
    data = (median, max(spread, 2.0) if integral else max(spread, 512.0))
    narrow = [(median, 10.0), (median, 1.0)] if integral else []
    windows = [data, *narrow]
    if every_kind:
        return windows
    return [windows[int(hashlib.sha1(file_id.encode()).hexdigest(), 16) % len(windows)]]


def _tag_window(path: Path) -> tuple[float, float] | None:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
    return first(center), first(width)


# ---------------------------------------------------------------------------------------------------------
# pydicom's Modality LUT


def _rescale_item(ds, frame: int):
    """The dataset holding frame ``frame``'s rescale: the Pixel Value Transformation of an enhanced
    object (per-frame group, else shared), else the dataset itself."""
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = ds.get(group)
        if items:
            item = items[frame if group.startswith("Per") and frame < len(items) else 0]
            transform = item.get("PixelValueTransformationSequence")
            if transform:
                return transform[0]
    return ds


@pytest.mark.parametrize("file_id", _ids("image", "mono1"))
def test_modality_lut_matches_pydicom(file_id):
    from pydicom.pixels import apply_modality_lut

    path = _decodable(file_id)
    image = _read(path, None, False)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = image.meta["frames"]  # badVR.dcm: pydicom cannot use its "1A"
    pixels = ds.pixel_array
    frames = pixels if pixels.ndim == 3 else pixels[None]
    reference = np.stack([apply_modality_lut(f, _rescale_item(ds, i)) for i, f in enumerate(frames)])
    reference = reference.reshape(image.array.shape).astype(np.float64)
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(image.array, reference, rtol=0, atol=2e-7 * scale, err_msg=file_id)
    if image.meta["photometric_interpretation"] == "MONOCHROME1":
        lo, hi = image.meta["value_range"]
        np.testing.assert_allclose(_read(path).array, lo + hi - reference, rtol=0, atol=4e-7 * scale)


@pytest.mark.parametrize("file_id", _ids("other"))
def test_non_image_objects_are_not_compared(file_id):
    """The files the suite does not compare, and what read_dicom must say about each."""
    kind, path = _catalogue().get(file_id, ("", None)) if file_id in _catalogue() else ("", _path(file_id))
    if kind.startswith("segmentation"):
        assert set(np.unique(_read(path).array)) <= {0.0, 1.0}  # binary masks, read as such
        return
    with pytest.raises(MedIOError) as err:
        read_dicom(path)
    if kind.startswith("non-image"):
        assert isinstance(err.value, NoPixelDataError), err.value.reason
    elif kind.startswith("header only"):  # an image SOP class without pixels is broken, others are no image
        assert "no pixel data" in err.value.reason or isinstance(err.value, NoPixelDataError), err.value.reason
    elif kind.startswith("broken"):
        assert isinstance(err.value, UndecodablePixelDataError) and "Rows/Columns" in err.value.reason
    else:  # nothing DICOM parses, or a data set with neither SOP class nor image attributes
        assert isinstance(err.value, (NotDicomError, NoPixelDataError)), err.value.reason


def test_undecodable_files_are_the_listed_ones():
    """Every file in UNDECODABLE that is present either decodes (a plugin was installed) or fails with a
    message that names the file; the parametrized tests fail for any other file that does not decode."""
    for file_id in UNDECODABLE:
        entry = _catalogue().get(file_id)
        if entry is None:
            continue
        try:
            _read(entry[1])
        except UndecodablePixelDataError as exc:
            assert str(entry[1]) in str(exc) and exc.reason


# ---------------------------------------------------------------------------------------------------------
# DCMTK: grayscale


@needs_dcmtk
@pytest.mark.parametrize("file_id", _ids("image", "mono1"))
def test_own_window_matches_dcmtk(file_id, dcmtk_dir):
    path = _decodable(file_id)
    image = _read(path, "tags")
    if image.meta.get("voi_applied") != "window_tags":
        pytest.skip(f"{file_id} has no window (read_dicom used {image.meta.get('voi_applied')})")
    source = _dcmtk_source(file_id, path, dcmtk_dir)
    tag = _tag_window(path)
    # disagreement 2: a window only in the functional groups is given to DCMTK explicitly
    options = ("+Wi", "1") if tag else ("+Ww", *(repr(v) for v in image.meta["voi_window"]))
    for i in _frames(image.array, False) if not image.meta.get("problems") else [0]:
        _assert_close(_frame(image.array, i, False), dcmtk(source, *options, frame=i), f"{file_id} frame {i + 1} {options}")


@needs_dcmtk
@pytest.mark.parametrize("file_id", _ids("image", "mono1"))
def test_explicit_window_matches_dcmtk(file_id, dcmtk_dir):
    path = _decodable(file_id)
    mono1 = _catalogue().get(file_id, ("",))[0] == "mono1"
    source = _dcmtk_source(file_id, path, dcmtk_dir)
    windows = _explicit_windows(file_id, path, every_kind=mono1)
    if mono1 and _tag_window(path):
        windows.append(_tag_window(path))  # issue #19 defect 1: the file's own window given explicitly
    for center, width in windows:
        image = _read(path, (center, width))
        for i in _frames(image.array, False) if not image.meta.get("problems") else [0]:
            reference = dcmtk(source, "+Ww", repr(center), repr(width), frame=i)
            _assert_close(_frame(image.array, i, False), reference, f"{file_id} frame {i + 1} window {center:g}/{width:g}")


@needs_dcmtk
@pytest.mark.parametrize("file_id", _ids("mono1"))
def test_monochrome1_raw_polarity_matches_dcmtk(file_id, dcmtk_dir):
    """invert_monochrome1=False keeps the stored polarity: DCMTK with an IDENTITY presentation LUT."""
    path = _decodable(file_id)
    source = _dcmtk_source(file_id, path, dcmtk_dir)
    center, width = _explicit_windows(file_id, path, every_kind=True)[0]
    image = _read(path, (center, width), False)
    _assert_close(image.array, dcmtk(source, "+Ww", repr(center), repr(width), "+Pid"), f"{file_id} +Pid")
    if _tag_window(path):
        _assert_close(_read(path, "tags", False).array, dcmtk(source, "+Wi", "1", "+Pid"), f"{file_id} +Wi 1 +Pid")


# ---------------------------------------------------------------------------------------------------------
# DCMTK: colour


@needs_dcmtk
@pytest.mark.parametrize("file_id", _ids("colour"))
def test_colour_matches_dcmtk(file_id, dcmtk_dir):
    """RGB (YBR and palette converted) on [0, 1]: read_dicom with a VOI asked for, which does not apply."""
    path = _decodable(file_id)
    image = _read(path, "tags")
    assert image.meta.get("voi_applied", "").startswith("none") and image.array.max() <= 1.0
    source = _dcmtk_source(file_id, path, dcmtk_dir)
    for i in _frames(image.array, True):
        _assert_close(_frame(image.array, i, True), dcmtk(source, frame=i), f"{file_id} frame {i + 1}")


# ---------------------------------------------------------------------------------------------------------
# DCMTK's own disagreements, with the evidence


@needs_dcmtk
def test_dcmtk_truncates_non_integer_rescale():
    path = _path("pydicom/test_files/dicomdirtests/77654033/CR1/6154")
    stored = float(pydicom.dcmread(path).pixel_array[0, 0])
    assert stored * 0.684 + 200 == pytest.approx(1563.896)
    value = dcmtk(path, "+Ww", "1564", "10")[0, 0]
    assert value == pytest.approx(1 - ((1563 - 1563.5) / 9 + 0.5), abs=1 / 65535)  # DCMTK used 1563
    ours = _read(path, (1564.0, 10.0)).array[0, 0]
    assert ours == pytest.approx(1 - ((1563.896 - 1563.5) / 9 + 0.5), abs=1e-5)  # the real-valued rescale


@needs_dcmtk
def test_dcmtk_ignores_functional_group_windows():
    path = shared_data("dicom_nifti_io_samples", "pydicom", "eCT_Supplemental.dcm")
    done = subprocess.run([DCM2PNM, "+opw", "+Wi", "1", str(path)], capture_output=True)
    assert done.returncode != 0 and re.search(rb"only 0 window", done.stderr)
    assert _read(path, "tags").meta["voi_window"] == [49.0, 102.0]


@needs_dcmtk
def test_dcmtk_misreads_mixed_encoding():
    path = _path("pydicom/test_files/SC_rgb_jpeg.dcm")
    done = subprocess.run([shutil.which("dcmj2pnm") or "dcmj2pnm", "+opw", str(path)], capture_output=True)
    assert done.returncode != 0 and b"Non-standard VR" in done.stderr
    assert _read(path).array.shape == (256, 256, 3)  # pydicom detects the implicit VR encoding


@needs_dcmtk
def test_dcmtk_misreads_big_endian_32_bit():
    def dcmtk_range(name: str) -> tuple[int, int]:
        done = subprocess.run([DCM2PNM, "-v", "-im", "-o", str(_path(f"pydicom/test_files/{name}"))], capture_output=True)
        found = dict(re.findall(rb"(maximum|minimum) pixel value : (\d+)", done.stderr))
        return int(found[b"minimum"]), int(found[b"maximum"])

    assert dcmtk_range("rtdose_1frame.dcm") == (795000, 1254000)
    assert dcmtk_range("rtdose_expb_1frame.dcm") == (62914575, 4292345870)  # 16-bit words swapped
    ours = _read(_path("pydicom/test_files/rtdose_expb_1frame.dcm")).array
    assert (ours.min(), ours.max()) == (795000.0, 1254000.0)


@needs_dcmtk
def test_dcmtk_ignores_per_frame_rescale(tmp_path):
    ds = pydicom.dcmread(shared_data("dicom_nifti_io_samples", "pydicom", "eCT_Supplemental.dcm"))
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    for i, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -1000.0)]):
        item = pydicom.Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "HU"
        ds.PerFrameFunctionalGroupsSequence[i].PixelValueTransformationSequence = pydicom.Sequence([item])
    ds.save_as(tmp_path / "perframe.dcm")
    done = subprocess.run([DCM2PNM, "-v", "-im", "-o", str(tmp_path / "perframe.dcm")], capture_output=True)
    assert b"minimum pixel value : 0" in done.stderr and b"maximum pixel value : 1196" in done.stderr
    from medtransfer.io import apply_window

    stored = ds.pixel_array
    np.testing.assert_allclose(dcmtk(tmp_path / "perframe.dcm", "+Ww", "1000", "2000", frame=1),
                               apply_window(stored[1], 1000, 2000), atol=1 / 65535)  # DCMTK: stored values
    ours = read_dicom(tmp_path / "perframe.dcm")
    assert ours.array[1, 200, 300] == 2.0 * stored[1, 200, 300] - 1000.0


# ---------------------------------------------------------------------------------------------------------
# Synthetic files for the paths no real file takes


def _mr_small():
    import copy

    return copy.deepcopy(pydicom.dcmread(Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"))


def _with_voi_lut(bits: int, *, mono1: bool = False, vr: str = "US", first_offset: int = 0):
    """MR_small with its window replaced by a VOI LUT Sequence (a square-root curve over the data range)."""
    ds = _mr_small()
    del ds.WindowCenter, ds.WindowWidth
    if mono1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    lo, hi = int(ds.pixel_array.min()) + first_offset, int(ds.pixel_array.max())
    lut = np.round(np.sqrt(np.linspace(0, 1, hi - lo + 1)) * (2**bits - 1)).astype(np.uint16)
    item = pydicom.Dataset()
    item.LUTDescriptor = [len(lut), lo, bits]
    item.add_new("LUTData", vr, lut.tolist() if vr == "US" else lut.astype("<u2").tobytes())
    ds.VOILUTSequence = pydicom.Sequence([item])
    return ds


def _with_modality_lut():
    """MR_small through a Modality LUT Sequence (2x + 100) instead of rescale, with a window."""
    ds = _mr_small()
    n = int(ds.pixel_array.max()) + 1
    item = pydicom.Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [n, 0, 16], "US"
    item.add_new("LUTData", "US", (np.arange(n) * 2 + 100).tolist())
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    ds.WindowCenter, ds.WindowWidth = 2000, 1000
    return ds


def _mono1(center=None, width=None):
    ds = _mr_small()
    ds.PhotometricInterpretation = "MONOCHROME1"
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    return ds


_MR_MEDIAN = 327  # median stored value of MR_small.dcm (asserted in test_synthetic_display_matches_dcmtk)

# name: (dataset builder, DCMTK options, read_dicom voi)
SYNTHETIC = {
    "voi-lut-12-bit": (lambda: _with_voi_lut(12), ("+Wl", "1"), "tags"),
    "voi-lut-16-bit": (lambda: _with_voi_lut(16), ("+Wl", "1"), "tags"),
    "voi-lut-8-bit-OW": (lambda: _with_voi_lut(8, vr="OW"), ("+Wl", "1"), "tags"),
    "voi-lut-first-mapped-above-min": (lambda: _with_voi_lut(12, first_offset=200), ("+Wl", "1"), "tags"),
    "voi-lut-monochrome1": (lambda: _with_voi_lut(10, mono1=True), ("+Wl", "1"), "tags"),
    "modality-lut-sequence": (_with_modality_lut, ("+Wi", "1"), "tags"),
    "monochrome1-window-width-10": (lambda: _mono1(_MR_MEDIAN, 10), ("+Wi", "1"), "tags"),
    "monochrome1-window-width-1": (_mono1, ("+Ww", str(_MR_MEDIAN), "1"), (float(_MR_MEDIAN), 1.0)),
    "monochrome1-bone-preset": (_mono1, ("+Ww", "400", "1800"), "bone"),
}


@needs_dcmtk
@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_display_matches_dcmtk(name, tmp_path):
    build, options, voi = SYNTHETIC[name]
    ds = build()
    assert float(np.median(ds.pixel_array)) == _MR_MEDIAN
    ds.save_as(tmp_path / f"{name}.dcm")
    image = _read(tmp_path / f"{name}.dcm", voi)
    assert 0.05 < float(((image.array > 0) & (image.array < 1)).mean()) or "width-1" in name  # not all clipped
    _assert_close(image.array, dcmtk(tmp_path / f"{name}.dcm", *options), f"{name} {' '.join(options)}")
