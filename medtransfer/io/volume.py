"""The volume type shared by the DICOM series, DICOM SEG and NIfTI readers.

Orientation convention (the same as MONAI's readers and nibabel):

* ``array`` axes are ``(i, j, k)`` = ``(column, row, slice)`` of the source images, i.e. ``X, Y, Z``;
  a 4D NIfTI adds the time/channel axis last. DICOM slices are ordered by increasing position
  along the slice normal (row direction × column direction of ImageOrientationPatient).
* ``affine`` maps ``(i, j, k, 1)`` to world coordinates in millimetres in **RAS+** (+x towards the
  patient's right, +y anterior, +z superior: DICOM's LPS with x and y negated). ``spacing`` is the
  length of the first three affine columns, ``origin`` the world position of voxel ``(0, 0, 0)``, ``direction`` the
  unit column vectors (3×3). A gantry-tilted series keeps its shear in the affine.
* :meth:`Volume.to_metatensor` gives a channel-first ``monai.data.MetaTensor`` with that affine,
  ready for ``Spacing``, ``Orientation`` and the other MONAI spatial transforms.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# DICOM patient coordinates are LPS; MONAI and NIfTI use RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Problem:
    """One thing wrong with a file or series: ``kind`` (machine-readable), ``message``, files involved."""

    kind: str
    message: str
    paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = self.paths[0] if self.paths else ""
        return d


@dataclass
class Volume:
    """A 3D (or 4D) image on a grid with a RAS affine (see the module docstring)."""

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``(i, j, k)``."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World (RAS) position in mm of the centre of voxel ``(0, 0, 0)``."""
        return tuple(float(v) for v in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """Unit direction (RAS) of each array axis, as the columns of a 3×3 matrix."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    def to_metatensor(self):
        """Channel-first ``monai.data.MetaTensor`` (``(1, X, Y, Z)``, or ``(T, X, Y, Z)`` for 4D)."""
        import torch
        from monai.data import MetaTensor

        arr = self.array[None] if self.array.ndim == 3 else np.moveaxis(self.array, -1, 0)
        affine = torch.as_tensor(self.affine, dtype=torch.float64)
        meta = {
            k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool)) or v is None
        }
        meta.update(
            original_affine=self.affine.copy(),
            spatial_shape=np.asarray(self.array.shape[:3]),
            space="RAS",
            original_channel_dim="no_channel" if self.array.ndim == 3 else -1,
            filename_or_obj=str(self.meta.get("source", "")),
        )
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), affine=affine, meta=meta)
