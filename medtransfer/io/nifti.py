"""NIfTI-1/-2 (``.nii``, ``.nii.gz``; 3D and 4D) → :class:`~medtransfer.io.volume.Volume` via nibabel.

Images are reoriented to the closest canonical orientation, **RAS+**
(``nibabel.as_closest_canonical``: a pure axis flip/permutation, no resampling), so array axes
point to the patient's Right, Anterior and Superior, the same convention as DICOM volumes from
:func:`medtransfer.io.read_series`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medtransfer.io.dicom import MedIOError
from medtransfer.io.volume import Volume


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """A ``.nii`` or ``.nii.gz`` file name (any case)."""
    return str(path).lower().endswith((".nii", ".nii.gz"))


def read_nifti(path: str | os.PathLike[str], *, canonical: bool = True, label: bool = False) -> Volume:
    """Read a NIfTI image. ``label=True`` returns an integer label map (``int16``, or ``int32`` if
    the labels need it) and fails on non-integer voxel values; otherwise ``float32`` with the
    header's scl_slope/scl_inter applied. ``canonical=False`` keeps the stored axis order.
    """
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise MedIOError(p, "file not found")
    if p.stat().st_size == 0:
        raise MedIOError(p, "empty file (0 bytes)")
    try:
        img = nib.load(str(p))
    except Exception as exc:
        raise MedIOError(p, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise MedIOError(p, f"not a NIfTI image (nibabel reads it as {type(img).__name__})")
    original_orientation = "".join(nib.aff2axcodes(img.affine))
    slope, inter = img.header.get_slope_inter()
    if canonical:
        img = nib.as_closest_canonical(img)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated .nii.gz, short data
        raise MedIOError(p, f"image data cannot be read, the file may be truncated ({type(exc).__name__}: {exc})") from None
    if label:
        values = np.asarray(data)
        rounded = np.rint(values)
        if np.issubdtype(values.dtype, np.floating) and not np.allclose(values, rounded, atol=1e-3):
            raise MedIOError(p, "label=True but the image holds non-integer values; is this an image rather than a mask?")
        dtype = np.int16 if rounded.size == 0 or (rounded.min() >= -32768 and rounded.max() <= 32767) else np.int32
        array = rounded.astype(dtype)
    else:
        array = np.asarray(data, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    header = img.header
    meta = {
        "source": str(p),
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "original_orientation": original_orientation,
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "orientation_convention": "RAS",
        "zooms": [float(z) for z in header.get_zooms()],
        "stored_dtype": str(header.get_data_dtype()),
        "scl_slope": None if slope is None else float(slope),
        "scl_inter": None if inter is None else float(inter),
        "is_label": label,
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }
    return Volume(array, np.asarray(img.affine, dtype=np.float64), meta)
