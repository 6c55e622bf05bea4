"""Medical image IO: DICOM, NIfTI and PNG into arrays in physical units with metadata."""
from medtransfer.io.dicom import (
    PHI_KEYWORDS,
    ImageData,
    MedIOError,
    NoPixelDataError,
    apply_window,
    dicom_meta,
    percentile_window,
    read_dicom,
    read_dicom_header,
)

__all__ = [
    "PHI_KEYWORDS",
    "ImageData",
    "MedIOError",
    "NoPixelDataError",
    "apply_window",
    "dicom_meta",
    "percentile_window",
    "read_dicom",
    "read_dicom_header",
]
