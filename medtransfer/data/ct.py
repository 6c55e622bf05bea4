"""CT volumes in Hounsfield units → the grid and intensity range of a 3D CT encoder.

The steps are the ones Merlin's MONAI pipeline runs (``merlin/data/monai_transforms.py``):
orientation to RAS, resampling to the encoder's voxel spacing (bilinear), HU clipped to a window and
scaled to [0, 1], zero padding (0 is the bottom of the window: air) and a centre crop to the
encoder's grid. The result keeps medtransfer's volume axis order ``(X, Y, Z)`` = array axes
``(i, j, k)`` of the RAS-oriented volume; the encoder permutes it to its own order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medtransfer.io.volume import Volume


@dataclass(frozen=True)
class CTPreprocessing:
    """The input contract of a CT encoder: orientation, voxel spacing, HU window and grid."""

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    """HU mapped to 0 and 1 (values outside are clipped)."""
    size: tuple[int, int, int] = (224, 224, 160)
    """Grid ``(X, Y, Z)`` after padding / centre cropping."""
    axis_order: str = "[B, 1, X, Y, Z]: array axes (i, j, k) of the RAS-oriented volume"
    channels: str = "1 channel (HU); the encoder repeats it to the 3 channels of its inflated ImageNet stem"

    def window(self, hu: np.ndarray) -> np.ndarray:
        """HU → [0, 1] by the window (clipped), as float32."""
        lo, hi = self.hu_window
        return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _axcodes(affine: np.ndarray) -> str:
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(affine))


def preprocess_ct(volume: Volume, prep: CTPreprocessing, size: tuple[int, int, int] | None = None
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """A CT :class:`Volume` in HU → ``(X, Y, Z)`` float32 in [0, 1] on ``prep``'s grid, and a report.

    ``size`` replaces ``prep.size`` (e.g. a smaller grid to save compute; the spacing stays). The
    report gives the orientation and spacing before and after, the shapes, the HU percentiles, the
    fractions of voxels clipped at either end of the window, and the output's RAS affine.
    """
    from monai.transforms import CenterSpatialCrop, Orientation, ScaleIntensityRange, Spacing, SpatialPad

    if volume.array.ndim != 3:
        raise ValueError(f"expected a 3D CT volume, got an array of shape {volume.array.shape}")
    grid = tuple(size or prep.size)
    lo, hi = prep.hu_window
    x = volume.to_metatensor()
    x = Orientation(axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)  # the affine is RAS
    x = Spacing(pixdim=prep.spacing_mm, mode="bilinear")(x)
    resampled = x.shape[1:]
    hu = x.array[0]
    x = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(x)
    x = CenterSpatialCrop(grid)(SpatialPad(grid)(x))
    out = np.ascontiguousarray(np.asarray(x.array[0], dtype=np.float32))
    report = {
        "orientation_in": _axcodes(volume.affine), "orientation_out": _axcodes(np.asarray(x.affine)),
        "spacing_in_mm": [round(s, 4) for s in volume.spacing],
        "spacing_out_mm": [round(float(s), 4) for s in np.linalg.norm(np.asarray(x.affine)[:3, :3], axis=0)],
        "shape_in": list(volume.array.shape), "shape_resampled": [int(s) for s in resampled],
        "shape_out": list(out.shape),
        "hu_percentiles_0.5_50_99.5": [round(float(v), 1) for v in np.percentile(hu, [0.5, 50, 99.5])],
        "fraction_below_window": float((hu < lo).mean()), "fraction_above_window": float((hu > hi).mean()),
        "out_range": [float(out.min()), float(out.max())], "hu_window": list(prep.hu_window),
        "affine_out": np.asarray(x.affine, dtype=np.float64).round(6).tolist(),
    }
    return out, report
