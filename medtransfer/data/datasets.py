"""From a samples table to tensors: the dataset the trainer and the evaluation read, and the
resolution of ``--data`` / ``--labels`` into a samples table."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medtransfer.data.preprocess import Preprocessor, require_finite
from medtransfer.data.samples import Sample, SampleTable, samples_from_folder, samples_from_npz
from medtransfer.errors import DataError
from medtransfer.io import MedIOError


class ImageSet(Dataset):
    """Samples → (``[0, 1]`` tensor ``(C, S, S)`` or ``(C, S, S, S)``, label); decoded images are
    cached in memory when ``cache``."""

    def __init__(self, table: SampleTable, samples: list[Sample], pre: Preprocessor, cache: bool = True):
        self.table, self.samples, self.pre = table, samples, pre
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor:
        """The sample's tensor, checked finite; a file that cannot be used stops with its path and patient."""
        s = self.samples[i]
        try:
            return require_finite(self._decode(s), self.describe(i))
        except MedIOError as exc:
            raise DataError(f"{exc} (patient {s.patient_id}, {s.split} split). Fix or remove it from the "
                            "labels, or set data.skip_bad_images=true to leave such images out.") from None

    def _decode(self, s: Sample) -> torch.Tensor:
        if self.table.source == "npz":
            array = self.table.arrays[s.split][s.index]
            return self.pre.load_npz_volume(array) if self.pre.spec.dims == 3 else self.pre.load_npz(array)
        if self.pre.spec.dims == 3:
            return self.pre.load_volume(s.path)
        return self.pre.load_image(s.path)

    def describe(self, i: int) -> str:
        """Where sample ``i`` comes from: its file, or its row in a ``.npz`` split."""
        s = self.samples[i]
        return f"{s.path} [{s.split}_images[{s.index}]]" if self.table.source == "npz" else s.path

    def label(self, i: int) -> int | float | torch.Tensor:
        y = self.samples[i].label
        return torch.tensor(y, dtype=torch.float32) if isinstance(y, tuple) else y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | float | torch.Tensor]:
        if self._cache is None:
            return self.load(i), self.label(i)
        if i not in self._cache:
            self._cache[i] = self.load(i)
        return self._cache[i], self.label(i)


def resolve_samples(data: str | os.PathLike[str] | None, labels: str | os.PathLike[str] | None,
                    classes: list[str] | None = None, outside_paths: str = "warn") -> SampleTable:
    """``None`` → the synthetic demo set; ``*.npz`` → MedMNIST; a folder → needs ``labels``.

    ``classes`` (``data.classes``) names the classes in index order: it orders named CSV labels and
    names numeric ones (CSV indices, a ``.npz`` file's classes)."""
    if data is None:
        from medtransfer.data.demo import LABEL_NAMES, demo_dataset_dir

        root = demo_dataset_dir()
        table = samples_from_folder(root, root / "labels.csv")
        table.label_names = list(LABEL_NAMES)
        return table
    path = Path(data)
    if path.suffix == ".npz":
        table = samples_from_npz(path)
        if classes:
            if len(classes) != table.num_classes:
                raise DataError(f"{path.name} has {table.num_classes} classes but data.classes names "
                                f"{len(classes)}: {list(classes)}.")
            table.label_names = list(classes)
        return table
    if path.is_dir():
        if labels is None:
            raise DataError(f"--data {path} is a folder; also pass --labels CSV (columns: path,label[,patient_id]).")
        return samples_from_folder(path, labels, classes, outside_paths)
    raise DataError(f"--data '{path}' is neither a folder nor a .npz file.")


def input_channels(table: SampleTable) -> int:
    """1 for grayscale, 3 for colour, D for ``(D, H, W)`` volumes (their slices become channels).
    A folder of colour PNG / JPEG images (dermoscopy, photographs) is colour when its first image is."""
    if table.source == "npz":
        first = next(iter(table.arrays.values()))
        if first.ndim == 4:
            return 3 if _npz_colour(first) else int(first.shape[1])
        return 1
    from medtransfer.io import is_raster_path, read_raster

    if table.samples and is_raster_path(table.samples[0].path):
        return 3 if read_raster(table.samples[0].path).array.ndim == 3 else 1
    return 1


def _npz_colour(images: np.ndarray) -> bool:
    """An ``(N, H, W, 3|4)`` stack of colour images, not ``(N, D, H, W)`` volumes."""
    return images.shape[-1] in (3, 4) and images.shape[1] not in (3, 4)


def holds_volumes(table: SampleTable) -> bool:
    """Whether the samples are volumes: a ``.npz`` of ``(D, H, W)`` arrays, or rows naming DICOM-series
    folders or 3D NIfTI files (judged on the first row, as :func:`input_channels` does)."""
    if table.source == "npz":
        first = next(iter(table.arrays.values()))
        return first.ndim == 4 and not _npz_colour(first)
    from medtransfer.io import is_nifti_path

    if not table.samples:
        return False
    path = table.samples[0].path
    if os.path.isdir(path):
        return True
    if is_nifti_path(path):
        import nibabel as nib

        shape = [n for n in nib.load(path).shape if n > 1]
        return len(shape) == 3
    return False


def volume_depth(table: SampleTable, size: int) -> int:
    """Slices a slice encoder gets per volume: a ``.npz``'s stored depth (all its volumes share it),
    else ``size`` (files of different depths are resampled to one grid, as for 3D backbones)."""
    if table.source == "npz":
        return int(next(iter(table.arrays.values())).shape[1])
    return int(size)
