"""Preset preprocessing: decoded image → ``[0, 1]`` → square ``size × size`` → the weights' contract.

Training, evaluation and ``predict`` all go through :func:`load_unit_image` and :class:`Preprocessor`,
so a run directory reproduces exactly the tensors its model was trained on.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medtransfer.io import ImageData, MedIOError, percentile_window, read_dicom


class UnsupportedImageError(MedIOError):
    """A readable image this model cannot take (e.g. a multi-frame volume into a 2D model)."""


class NonFiniteImageError(MedIOError):
    """An image whose values (after decoding and preprocessing) hold NaN or infinity."""


def require_finite(x: Any, where: str) -> Any:
    """``x`` (a decoded array or a tensor) unchanged, or :class:`NonFiniteImageError` naming how many
    values are NaN / infinite. Checked on the decoded values, before any window could hide them."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        raise NonFiniteImageError(where, f"the image holds {n_nan} NaN and {n_inf} infinite value(s) of "
                                         f"{a.size}; a model cannot use it (re-export the file, or remove it)")
    return x


@dataclass
class PreprocessSpec:
    """Everything needed to turn a file into a model input; saved inside every checkpoint."""

    size: int
    channels: int
    window: str
    percentiles: tuple[float, float]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dims: int = 2
    """2: one image per file; 3: one volume per series, resized to ``size`` in every axis."""
    ct: dict[str, Any] | None = None
    """A CT encoder's contract (:class:`~medtransfer.data.ct.CTPreprocessing` as a dict): volumes in HU
    are put in its orientation, spacing and HU window on a ``size × size × size·Z/X`` grid instead of
    being percentile-windowed and resized."""
    depth: int = 0
    """Volumes for a 2D backbone's slice encoder (``dims == 3``): resized to ``depth`` slices of
    ``size × size`` and given as ``(depth, size, size)``, one slice per channel row (0: a 3D backbone's
    ``(C, size, size, size)``)."""

    @property
    def tensor_dims(self) -> int:
        """Spatial dimensions of a model input: a slice encoder's ``(depth, size, size)`` is a 2D tensor
        with ``depth`` channels, even though each file is a volume (``dims == 3``)."""
        return 2 if self.depth else self.dims

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        return cls(
            int(d["size"]), int(d["channels"]), str(d["window"]), tuple(d["percentiles"]),
            tuple(d["mean"]), tuple(d["std"]), int(d.get("dims", 2)), d.get("ct"), int(d.get("depth", 0)),
        )


def preprocess_spec(data_cfg: Any, channels: int, mean: tuple[float, ...], std: tuple[float, ...],
                    dims: int = 2, ct: Any = None, depth: int = 0) -> PreprocessSpec:
    """The preprocessing of a run from its ``data`` config and the weights' mean/std; the per-channel
    mean/std are averaged when the input channels differ from the weights' (exact for mean = std = 0.5
    with summed stem kernels)."""
    if len(mean) != channels:
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return PreprocessSpec(size=data_cfg.size, channels=channels, window=data_cfg.window,
                          percentiles=tuple(data_cfg.percentiles), mean=tuple(mean), std=tuple(std), dims=dims,
                          ct=ct.to_dict() if ct is not None else None, depth=depth)


def dicom_to_unit(image: ImageData, spec: PreprocessSpec) -> np.ndarray:
    """A decoded 2D DICOM image (physical units, higher = brighter) → ``(C, H, W)`` in ``[0, 1]``."""
    require_finite(image.array, str(image.meta.get("path", "image")))
    a = image.array
    if a.ndim == 3 and a.shape[-1] == 3:  # RGB
        unit = np.clip(a / 255.0 if a.max() > 1.0 else a, 0, 1).transpose(2, 0, 1)
        return _match_channels(unit, spec.channels, image)
    if a.ndim != 2:
        raise UnsupportedImageError(
            image.meta.get("path", "?"),
            f"not a single 2D image (array shape {tuple(a.shape)}); this model takes 2D images",
        )
    lo_p, hi_p = spec.percentiles
    c, w = image.meta.get("window_center"), image.meta.get("window_width")
    if spec.window == "tags" and c is not None and w:
        from medtransfer.io import apply_window

        unit = apply_window(a, c, w)
    elif spec.window in ("tags", "percentile"):
        unit = percentile_window(a, lo_p, hi_p)
    else:  # "none": the representable range of the file
        lo, hi = image.meta.get("value_range") or (float(a.min()), float(a.max()))
        unit = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
    return _match_channels(unit[None].astype(np.float32), spec.channels, image)


def _match_channels(unit: np.ndarray, channels: int, image: ImageData | None = None) -> np.ndarray:
    if unit.shape[0] == channels:
        return unit
    if unit.shape[0] == 1:
        return np.repeat(unit, channels, axis=0)
    if channels == 1 and unit.shape[0] == 3:
        # ITU-R BT.601 luma
        return (0.299 * unit[0:1] + 0.587 * unit[1:2] + 0.114 * unit[2:3]).astype(np.float32)
    where = image.meta.get("path", "?") if image else "?"
    raise UnsupportedImageError(where, f"image has {unit.shape[0]} channels, the model expects {channels}")


def npz_to_unit(array: np.ndarray, channels: int) -> np.ndarray:
    """A MedMNIST image → ``(C, H, W)`` in ``[0, 1]``.

    ``(H, W)`` grayscale and ``(H, W, 3)`` colour images; a ``(D, H, W)`` volume becomes D channels
    (2.5D: its slices are the input channels of a 2D backbone whose stem is adapted to D channels).
    """
    a = array.astype(np.float32)
    a = a / 255.0 if array.dtype == np.uint8 or a.max() > 1.0 else a
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (3, 4):
        a = a[..., :3].transpose(2, 0, 1)
    return _match_channels(np.ascontiguousarray(a), channels)


def _canonical(vol: Any) -> np.ndarray:
    """The volume's array in the closest RAS axis order, so that a NIfTI file and a DICOM series of the
    same anatomy (stored in any acquisition orientation) reach the model the same way round."""
    from nibabel.orientations import apply_orientation, io_orientation

    a = np.asarray(vol.array, dtype=np.float32)
    if a.ndim != 3:
        return a
    return np.ascontiguousarray(apply_orientation(a, io_orientation(vol.affine)))


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad ``(C, H, W)`` (or ``(N, C, H, W)``) with zeros to a centred square, then resize to ``size``."""
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None]
    h, w = x.shape[-2:]
    if h != w:
        m = max(h, w)
        top, left = (m - h) // 2, (m - w) // 2
        x = F.pad(x, (left, m - w - left, top, m - h - top))
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    return x[0] if squeeze else x


class Preprocessor:
    """Turns a sample source into a resized ``[0, 1]`` tensor and normalises batches."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)

    def load_dicom(self, path: str) -> torch.Tensor:
        return self.load_dicom_with_meta(path)[0]

    def load_image(self, path: str) -> torch.Tensor:
        """Any 2D image file of a labels CSV → resized ``[0, 1]`` tensor ``(C, S, S)``: DICOM (physical
        units, the preset's window), PNG / JPEG / TIFF / BMP (display values scaled by their format's
        range; no window), or a 2D NIfTI image (physical units, the preset's window; no VOI tags)."""
        from medtransfer.io import is_nifti_path, is_raster_path, read_nifti, read_raster

        if is_raster_path(path):
            image = read_raster(path)
            lo, hi = image.meta["value_range"]
            a = image.array.astype(np.float32)
            unit = np.clip((a - lo) / (hi - lo), 0, 1)
            unit = unit.transpose(2, 0, 1) if unit.ndim == 3 else unit[None]
            return resize_square(torch.from_numpy(_match_channels(unit, self.spec.channels, image)), self.spec.size)
        if os.path.isdir(path):
            raise UnsupportedImageError(path, "a folder (a DICOM series?): this model takes 2D images; a 3D "
                                        "backbone (medicalnet_resnet10.23datasets, tiny_cnn3d.random) takes series")
        if is_nifti_path(path):
            vol = read_nifti(path)
            a = np.squeeze(np.asarray(vol.array, dtype=np.float32))
            if a.ndim != 2:
                raise UnsupportedImageError(
                    path, f"a {a.ndim}D NIfTI image (shape {tuple(vol.array.shape)}); this model takes 2D images. "
                    "Choose a 3D backbone (medicalnet_resnet10.23datasets, tiny_cnn3d.random) for volumes.")
            return resize_square(torch.from_numpy(dicom_to_unit(ImageData(a, {"path": path}), self.spec)),
                                 self.spec.size)
        return self.load_dicom(path)

    def load_dicom_with_meta(self, path: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """A DICOM file → resized ``[0, 1]`` tensor ``(C, S, S)`` and its metadata."""
        image = read_dicom(path)
        image.meta["path"] = path
        return resize_square(torch.from_numpy(dicom_to_unit(image, self.spec)), self.spec.size), image.meta

    def load_npz(self, array: np.ndarray) -> torch.Tensor:
        return resize_square(torch.from_numpy(npz_to_unit(array, self.spec.channels)), self.spec.size)

    def load_npz_volume(self, array: np.ndarray) -> torch.Tensor:
        """A MedMNIST ``(D, H, W)`` volume for a 3D backbone → ``(C, S, S, S)`` (stored values scaled to
        ``[0, 1]`` as for 2D, no window: MedMNIST volumes are already normalised)."""
        if array.ndim != 3:
            raise UnsupportedImageError("npz", f"a 3D backbone needs (D, H, W) volumes, got shape {array.shape}")
        a = array.astype(np.float32)
        return self._resize_volume(a / 255.0 if array.dtype == np.uint8 or a.max() > 1.0 else a)

    def _volume_tensor(self, a: np.ndarray, where: str) -> torch.Tensor:
        """A 3D array in physical units → ``(C, S, S, S)`` in ``[0, 1]`` (percentile window)."""
        if a.ndim != 3:
            raise UnsupportedImageError(where, f"expected a 3D grayscale volume, got shape {a.shape}")
        return self._resize_volume(percentile_window(require_finite(a, where), *self.spec.percentiles))

    def _resize_volume(self, unit: np.ndarray) -> torch.Tensor:
        """A ``[0, 1]`` volume → ``(C, S, S, S)``: trilinear to ``size`` in every axis, channels repeated
        (for a slice encoder: ``(depth, S, S)``)."""
        x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None, None]
        s = self.spec.size
        if self.spec.depth:  # a 2D backbone's slice encoder: (depth, S, S), slices along the first axis
            return F.interpolate(x, size=(self.spec.depth, s, s), mode="trilinear", align_corners=False)[0, 0]
        x = F.interpolate(x, size=(s, s, s), mode="trilinear", align_corners=False)[0]
        return x.repeat(self.spec.channels, 1, 1, 1) if self.spec.channels > 1 else x

    def _ct_tensor(self, vol: Any, where: str) -> torch.Tensor:
        """A CT volume in HU → ``(C, X, Y, Z)`` on the encoder's contract (orientation, spacing, window);
        the grid is ``size`` in-plane and the contract's aspect through the slices."""
        from medtransfer.data.ct import CTPreprocessing, preprocess_ct

        if vol.array.ndim != 3:
            raise UnsupportedImageError(where, f"expected a 3D CT volume, got shape {vol.array.shape}")
        require_finite(vol.array, where)
        contract = CTPreprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.spec.ct.items()})
        x_size, _, z_size = contract.size
        s = self.spec.size
        unit, _ = preprocess_ct(vol, contract, size=(s, s, max(1, round(s * z_size / x_size))))
        x = torch.from_numpy(unit)[None]
        return x.repeat(self.spec.channels, 1, 1, 1) if self.spec.channels > 1 else x

    def load_volume(self, path: str) -> torch.Tensor:
        """A 3D sample of a labels CSV → ``(C, S, S, S)``: a NIfTI volume (canonical RAS order) or a
        folder holding one DICOM series (slices ordered by position)."""
        from medtransfer.io import is_nifti_path, read_nifti
        from medtransfer.io.series import list_files

        if os.path.isdir(path):
            return self.load_series([str(p) for p in list_files(path)])[0]
        if is_nifti_path(path):
            vol = read_nifti(path)
            if vol.array.ndim == 4 and vol.array.shape[-1] == 1:
                vol.array = vol.array[..., 0]
            return self._ct_tensor(vol, path) if self.spec.ct else self._volume_tensor(_canonical(vol), path)
        raise UnsupportedImageError(path, "a 3D model takes a NIfTI volume or a folder with one DICOM series")

    def load_series(self, paths: list[str]) -> tuple[torch.Tensor, dict[str, str]]:
        """A DICOM series → ``(C, S, S, S)`` in ``[0, 1]`` (percentile window) and its identifiers.

        The volume is assembled by :func:`medtransfer.io.series.read_series` (slices ordered by
        position, geometry checked); problems that make it unusable raise :class:`MedIOError`.
        """
        from medtransfer.io.series import read_series

        vol = read_series(paths, strict=False)
        serious = [p for p in vol.problems if p.kind in ("mixed_size", "mixed_orientation", "no_position")]
        if serious:
            raise UnsupportedImageError(paths[0], "; ".join(p.message for p in serious))
        x = self._ct_tensor(vol, paths[0]) if self.spec.ct else self._volume_tensor(_canonical(vol), paths[0])
        meta = vol.meta or {}
        ids = {"sop_instance_uid": "", "study_instance_uid": str(meta.get("study_instance_uid", "")),
               "series_instance_uid": str(meta.get("series_instance_uid", ""))}
        return x, ids

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` batch ``(N, C, H, W[, D])`` → the intensity contract of the weights."""
        mean, std = self._mean.to(batch.device), self._std.to(batch.device)
        if batch.ndim == 5:
            mean, std = mean[..., None], std[..., None]
        if mean.shape[1] != batch.shape[1]:
            mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
        return (batch - mean) / std
