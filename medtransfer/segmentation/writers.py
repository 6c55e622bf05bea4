"""Mask writers: NIfTI on the input's own grid, DICOM SEG (highdicom) referencing the source series."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medtransfer.io import Volume


_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_nifti_mask(path: str | os.PathLike[str], mask: np.ndarray, vol: Volume,
                     source: str | os.PathLike[str] | None = None) -> Path:
    """Write ``mask`` (on ``vol``'s RAS-canonical grid) as NIfTI. With ``source`` (the input NIfTI)
    the mask is put back into the source's axis order and carries the source's affine and
    qform/sform codes; otherwise ``vol.affine`` is used."""
    import nibabel as nib

    path = Path(path)
    data = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.int16)
    if source is not None:
        src = nib.load(str(source))
        tr = nib.orientations.ornt_transform(nib.io_orientation(vol.affine), nib.io_orientation(src.affine))
        data = nib.orientations.apply_orientation(data, tr).astype(data.dtype)
        header = src.header.copy()
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(1.0, 0.0)
        img = nib.Nifti1Image(data, src.affine, header)
        img.set_qform(src.affine, int(src.header["qform_code"]) or 1)
        img.set_sform(src.affine, int(src.header["sform_code"]) or 1)
    else:
        img = nib.Nifti1Image(data, vol.affine)
        img.set_qform(vol.affine, 1)
        img.set_sform(vol.affine, 1)
    tmp = _atomic_target(path)
    tmp = tmp.with_name(tmp.name + ".nii.gz")
    nib.save(img, str(tmp))
    os.replace(tmp, path)
    return path


def write_dicom_seg(path: str | os.PathLike[str], mask: np.ndarray, vol: Volume, label_names: list[str],
                    *, series_description: str = "medtransfer segmentation") -> Path:
    """Write a BINARY DICOM SEG for ``mask`` (``(X, Y, Z)`` on the grid of the DICOM series ``vol``),
    one segment per foreground label, referencing the source SOP instances (highdicom)."""
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError as exc:  # pragma: no cover - highdicom is a dependency
        raise ImportError("Writing DICOM SEG needs highdicom: pip install highdicom") from exc
    from medtransfer._version import __version__

    files = vol.meta.get("files")
    if not files or len(files) != mask.shape[2]:
        raise ValueError("DICOM SEG needs the source series files in slice order (read the input with read_series)")
    sources = [pydicom.dcmread(f) for f in files]
    for ds in sources:  # type 2 patient/study attributes highdicom copies: empty when the source lacks them
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:  # empty: the default repertoire
            del ds.SpecificCharacterSet
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    frames = np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8)  # (Z, rows=Y, cols=X)
    algo = hd.AlgorithmIdentificationSequence(name="medtransfer", version=__version__,
                                              family=codes.cid7162.ArtificialIntelligence)
    present = [k for k in range(1, len(label_names)) if (frames == k).any()]
    if not present:
        raise ValueError("the predicted mask is empty; no DICOM SEG written (the NIfTI mask was)")
    descriptions, remap = [], np.zeros(len(label_names), dtype=np.uint8)
    for number, k in enumerate(present, start=1):
        remap[k] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(label_names[k])[:64],
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=remap[frames], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medtransfer",
        manufacturer_model_name="medtransfer segmentation", software_versions=__version__,
        device_serial_number="0", series_description=series_description,
    )
    path = Path(path)
    tmp = _atomic_target(path)
    seg.save_as(str(tmp))
    os.replace(tmp, path)
    return path
