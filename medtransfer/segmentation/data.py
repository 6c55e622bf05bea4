"""Segmentation cases: discovery (Decathlon / folder pairs / DICOM + SEG), loading, preprocessing,
case-level splits and patch sampling with foreground oversampling.

Preprocessing (the same at training and prediction time, recorded in the checkpoint):
resample to ``spacing`` (images linearly, masks by nearest neighbour, MONAI ``Spacing``), then
normalise: ``zscore`` (per volume, on nonzero voxels by default; MR) or ``window`` (HU clipped to
``window`` and scaled to [0, 1]; CT).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.errors import DataError
from medtransfer.io import MedIOError, Volume, read_nifti, read_seg, read_series

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")  # nnU-Net style image_0000.nii.gz


def is_nifti(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def case_id_of(path: str | os.PathLike[str]) -> str:
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return _CHANNEL_SUFFIX.sub("", name)


@dataclass
class SegCase:
    """One image/mask pair: NIfTI files, or a DICOM series (its files) with a DICOM SEG."""

    case_id: str
    image: str | list[str]
    label: str | None
    kind: str = "nifti"  # nifti | dicom


@dataclass
class PreparedCase:
    """A case after preprocessing: ``image`` float32 ``(X, Y, Z)`` and ``label`` int ``(X, Y, Z)`` on
    the target grid; ``volume`` and ``true`` on the original grid (for the final report)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    volume: Volume | None = None
    true: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# discovery


def _pair_folders(images: Path, labels: Path) -> list[SegCase]:
    label_by_id = {case_id_of(p): p for p in labels.iterdir() if is_nifti(p) and not p.name.startswith(".")}
    cases, unpaired = [], []
    for p in sorted(images.iterdir()):
        if not is_nifti(p) or p.name.startswith("."):
            continue
        cid = case_id_of(p)
        if cid in label_by_id:
            cases.append(SegCase(cid, str(p), str(label_by_id[cid])))
        else:
            unpaired.append(p.name)
    if unpaired:
        logger.warning("%d image(s) in %s have no mask in %s and are left out (e.g. %s)",
                       len(unpaired), images, labels, unpaired[0])
    return cases


def _dicom_cases(root: Path) -> list[SegCase]:
    from medtransfer.io.dicom import read_dicom_header
    from medtransfer.io.seg import SEG_SOP_CLASS
    from medtransfer.io.series import find_series, list_files

    series, _ = find_series(root)
    by_uid = {s.series_instance_uid: s for s in series}
    cases = []
    for path in list_files(root):
        try:
            ds = read_dicom_header(path)
        except MedIOError:
            continue
        if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
            continue
        refs = ds.get("ReferencedSeriesSequence") or []
        uid = str(refs[0].SeriesInstanceUID) if refs else ""
        if uid not in by_uid:
            logger.warning("DICOM SEG %s refers to series %s, which is not under %s; left out", path, uid, root)
            continue
        cases.append(SegCase(Path(path).stem, [str(p) for p in by_uid[uid].paths], str(path), kind="dicom"))
    return cases


def discover_cases(path: str | os.PathLike[str]) -> tuple[list[SegCase], list[str] | None]:
    """Image/mask pairs under ``path`` and the label names if the dataset declares them.

    Accepted layouts: a Medical Segmentation Decathlon folder (``dataset.json`` with ``training``
    and ``labels``; or just ``imagesTr``/``labelsTr`` without ``dataset.json``), an
    ``images``/``labels`` folder pair (same file names), or a folder of DICOM series with DICOM SEG
    files that reference them.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"Segmentation data folder '{root}' not found.")
    names = None
    ds_json = root / "dataset.json"
    if ds_json.is_file():
        meta = json.loads(ds_json.read_text())
        labels = meta.get("labels") or {}
        if labels:
            if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background", ...}
                n = max(int(k) for k in labels) + 1
                names = [str(labels.get(str(i), f"label_{i}")) for i in range(n)]
            else:  # nnU-Net v2: {"background": 0, ...}
                inv = {int(v): str(k) for k, v in labels.items()}
                names = [inv.get(i, f"label_{i}") for i in range(max(inv) + 1)]
        training = meta.get("training") or []
        if training:
            cases = []
            for item in training:
                img, lbl = root / item["image"], root / item["label"]
                if not img.is_file():  # MSD lists 4D images; nnU-Net keeps _0000 channel files
                    alt = img.with_name(case_id_of(img) + "_0000.nii.gz")
                    img = alt if alt.is_file() else img
                cases.append(SegCase(case_id_of(img), str(img), str(lbl)))
            return cases, names
    for img_dir, lbl_dir in (("imagesTr", "labelsTr"), ("images", "labels")):
        if (root / img_dir).is_dir() and (root / lbl_dir).is_dir():
            cases = _pair_folders(root / img_dir, root / lbl_dir)
            if not cases:
                raise DataError(f"No image/mask pairs with matching names in '{root / img_dir}' and '{root / lbl_dir}'.")
            return cases, names
    cases = _dicom_cases(root)
    if cases:
        return cases, names
    raise DataError(
        f"No segmentation cases found in '{root}'. Expected a Decathlon folder (imagesTr/ + labelsTr/, "
        "dataset.json optional), images/ + labels/ with matching file names, or DICOM series with DICOM SEG files."
    )


def split_cases(case_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded case-level split → ``{case_id: "train" | "val" | "test"}`` (a case is one patient)."""
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    n_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    out = {}
    for rank, i in enumerate(order):
        out[ids[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


# ------------------------------------------------------------------------------------------------
# loading and preprocessing


def load_case(case: SegCase) -> tuple[Volume, np.ndarray | None]:
    """The image volume (RAS, canonical axes for NIfTI) and its label map on the same grid."""
    if case.kind == "dicom":
        vol = read_series(case.image)
        label = read_seg(case.label, vol).label_map().astype(np.int16) if case.label else None
        return vol, label
    vol = read_nifti(case.image)
    if vol.array.ndim != 3:
        raise MedIOError(case.image, f"expected a 3D image, got shape {vol.array.shape}; multi-channel images are not supported")
    if case.label is None:
        return vol, None
    lab = read_nifti(case.label, label=True)
    if lab.array.shape != vol.array.shape or not np.allclose(lab.affine, vol.affine, atol=1e-3):
        raise MedIOError(case.label, f"mask grid {lab.array.shape} does not match image grid {vol.array.shape} "
                         "(shape or affine differ)")
    return vol, lab.array


def _needs_resampling(vol_affine: np.ndarray, spacing: list[float] | None) -> bool:
    if not spacing:
        return False
    current = np.linalg.norm(vol_affine[:3, :3], axis=0)
    return not np.allclose(current, spacing, rtol=1e-3, atol=1e-3)


def resample(array: np.ndarray, affine: np.ndarray, spacing: list[float] | None, *, label: bool) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) resampled to ``spacing`` mm (nearest for labels) → ``(array, affine)``."""
    if not _needs_resampling(affine, spacing):
        return array, affine
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    mt = MetaTensor(torch.as_tensor(np.ascontiguousarray(array)[None], dtype=torch.float32),
                    affine=torch.as_tensor(affine, dtype=torch.float64))
    out = Spacing(pixdim=tuple(spacing), mode="nearest" if label else "bilinear", padding_mode="border")(mt)
    arr = out.array[0] if hasattr(out, "array") else np.asarray(out[0])
    arr = np.asarray(arr)
    if label:
        arr = np.rint(arr).astype(np.int16)
    return arr.astype(np.int16 if label else np.float32), np.asarray(out.affine, dtype=np.float64)


def normalize(image: np.ndarray, prep: dict[str, Any]) -> np.ndarray:
    """Intensity normalisation of the preset: ``zscore`` (MR) or ``window`` (CT HU clip + scale)."""
    image = image.astype(np.float32, copy=False)
    kind = prep["normalize"]
    if kind == "window":
        lo, hi = prep["window"]
        return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if kind == "zscore":
        mask = image != 0 if prep.get("zscore_nonzero", True) else np.ones(image.shape, bool)
        if mask.sum() < 2:
            mask = np.ones(image.shape, bool)
        vals = image[mask]
        mean, std = float(vals.mean()), float(vals.std())
        out = np.zeros_like(image)
        out[mask] = (image[mask] - mean) / (std if std > 1e-8 else 1.0)
        return out
    return image


def preprocess(vol: Volume, label: np.ndarray | None, prep: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resample + normalise one case → ``(image, label, affine)`` on the target grid."""
    image, affine = resample(vol.array, vol.affine, prep.get("spacing"), label=False)
    lab = None
    if label is not None:
        lab, _ = resample(label, vol.affine, prep.get("spacing"), label=True)
    return normalize(image, prep), lab, affine


def prepare_cases(cases: list[SegCase], prep: dict[str, Any], *, keep_original: bool = False) -> tuple[list[PreparedCase], list[dict[str, str]]]:
    """Load and preprocess ``cases``; unreadable ones are skipped and returned as problems."""
    out, problems = [], []
    for case in cases:
        try:
            vol, label = load_case(case)
            image, lab, affine = preprocess(vol, label, prep)
        except (MedIOError, DataError, ValueError, RuntimeError) as exc:
            problems.append({"case_id": case.case_id, "reason": str(exc)})
            logger.warning("case %s left out: %s", case.case_id, exc)
            continue
        out.append(PreparedCase(case.case_id, image, lab, affine,
                                volume=vol if keep_original else None,
                                true=label if keep_original else None))
    return out, problems


# ------------------------------------------------------------------------------------------------
# model inputs


def slice_stack(volume: np.ndarray, axis: int, context: int) -> np.ndarray:
    """``(X, Y, Z)`` → ``(D, 2·context+1, H, W)``: each slice with its neighbours as channels
    (edge slices repeated at the borders)."""
    v = np.moveaxis(volume, axis, 0)
    d = v.shape[0]
    idx = np.clip(np.arange(d)[:, None] + np.arange(-context, context + 1)[None], 0, d - 1)
    return v[idx]


class PatchDataset(torch.utils.data.Dataset):
    """Random training patches with foreground oversampling (MONAI ``RandCropByPosNegLabeld``).

    ``dims=3``: ``(1, *patch)`` patches from whole volumes; ``dims=2``: a slice (foreground slices
    drawn with probability ``pos_fraction``) with ``2·context+1`` neighbouring slices as channels,
    then a ``patch``-sized crop. ``length`` samples per epoch; seeded.
    """

    def __init__(self, cases: list[PreparedCase], *, dims: int, patch: list[int], length: int,
                 pos_fraction: float = 0.67, context: int = 1, slice_axis: int = 2, seed: int = 0):
        from monai.transforms import RandCropByPosNegLabeld, RandSpatialCropd, SpatialPadd

        self.dims, self.patch, self.length = dims, list(patch), length
        self.context, self.pos_fraction = context, pos_fraction
        self.rng = np.random.default_rng(seed)
        self.pad = SpatialPadd(keys=["image", "label"], spatial_size=self.patch)
        pos = max(pos_fraction, 1e-6)
        self.crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=self.patch,
                                           pos=pos, neg=max(1.0 - pos_fraction, 0.0), num_samples=1,
                                           allow_smaller=True)
        self.crop.set_random_state(seed=seed)
        self.crop_any = RandSpatialCropd(keys=["image", "label"], roi_size=self.patch, random_size=False)
        self.crop_any.set_random_state(seed=seed + 1)
        if dims == 2:
            self.images = [np.moveaxis(c.image, slice_axis, 0) for c in cases]
            self.labels = [np.moveaxis(c.label, slice_axis, 0) for c in cases]
            self.fg_slices = [np.flatnonzero(lab.reshape(lab.shape[0], -1).any(1)) for lab in self.labels]
        else:
            self.images = [c.image for c in cases]
            self.labels = [c.label for c in cases]

    def __len__(self) -> int:
        return self.length

    def _random_states(self) -> list[np.random.RandomState]:
        return [self.crop.R, self.crop.cropper.R, self.crop_any.R, self.crop_any.cropper.R]

    def state_dict(self) -> dict[str, Any]:
        """Where every random generator of the sampler stands, so a resumed run draws the same patches."""
        legacy = []
        for r in self._random_states():
            name, keys, pos, has_gauss, gauss = r.get_state()
            legacy.append([name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss])
        return {"rng": self.rng.bit_generator.state, "crops": legacy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        for r, (name, keys, pos, has_gauss, gauss) in zip(self._random_states(), state["crops"]):
            r.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = int(self.rng.integers(len(self.images)))
        img, lab = self.images[k], self.labels[k]
        if self.dims == 2:
            fg = self.fg_slices[k]
            if len(fg) and self.rng.random() < self.pos_fraction:
                s = int(self.rng.choice(fg))
            else:
                s = int(self.rng.integers(img.shape[0]))
            idx = np.clip(np.arange(s - self.context, s + self.context + 1), 0, img.shape[0] - 1)
            x, y = img[idx], lab[s][None]
        else:
            x, y = img[None], lab[None]
        d = {"image": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
             "label": torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))}
        d = self.pad(d)
        d = self.crop(d)[0] if bool(d["label"].any()) else self.crop_any(d)  # no foreground: a plain random crop
        return {"image": torch.as_tensor(d["image"]).float(), "label": torch.as_tensor(d["label"]).long()}
