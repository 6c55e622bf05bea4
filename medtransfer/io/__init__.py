"""Medical image IO: DICOM, DICOM series and SEG, NIfTI into arrays in physical units with metadata."""
from medtransfer.io.dicom import (
    PHI_KEYWORDS,
    ImageData,
    MedIOError,
    NoPixelDataError,
    NotDicomError,
    UndecodablePixelDataError,
    decoder_for,
    dicom_meta,
    frame_geometry,
    frame_rescale,
    read_dicom,
    read_dicom_header,
)
from medtransfer.io.inventory import inventory, render_inventory
from medtransfer.io.nifti import is_nifti_path, read_nifti
from medtransfer.io.raster import RASTER_SUFFIXES, is_raster_path, read_raster
from medtransfer.io.seg import Segmentation, read_seg
from medtransfer.io.series import SeriesFiles, find_series, order_slices, read_series
from medtransfer.io.volume import Problem, Volume
from medtransfer.io.windows import (
    WINDOW_STACKS,
    WINDOWS,
    apply_window,
    percentile_window,
    resolve_window,
    stack_windows,
    window_by_name,
)

__all__ = [
    "PHI_KEYWORDS",
    "RASTER_SUFFIXES",
    "WINDOWS",
    "WINDOW_STACKS",
    "ImageData",
    "MedIOError",
    "NoPixelDataError",
    "NotDicomError",
    "Problem",
    "Segmentation",
    "SeriesFiles",
    "UndecodablePixelDataError",
    "Volume",
    "apply_window",
    "decoder_for",
    "dicom_meta",
    "find_series",
    "frame_geometry",
    "frame_rescale",
    "inventory",
    "is_nifti_path",
    "is_raster_path",
    "order_slices",
    "percentile_window",
    "read_dicom",
    "read_dicom_header",
    "read_nifti",
    "read_raster",
    "read_seg",
    "read_series",
    "render_inventory",
    "resolve_window",
    "stack_windows",
    "window_by_name",
]
