"""Saliency maps beside batch predictions (the report's gallery is :mod:`medtransfer.run.report`).

* :class:`SaliencyWriter` is the ``on_batch`` hook of :func:`medtransfer.inference.batch.run_batch`:
  per predicted input it writes ``<name>.png`` (the image as the model saw it, the map on top, the
  predicted class and its probability in the corner) and, for 3D models, ``<name>.nii.gz`` (the map
  resampled onto the input's grid: its shape and affine).
* :func:`predict_with_saliency` is ``predict_folder`` with that hook.

What is explained: for binary models always the positive class (where the evidence for the finding
lies, also on a negative call), otherwise the predicted class.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.inference.batch import BatchSummary, PredictOptions, WorkItem, run_batch
from medtransfer.evaluation.saliency import SaliencyExplainer, saliency_overlay
from medtransfer.run import LoadedRun, load_run
from medtransfer.run.report import png_bytes
from medtransfer.utils.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

__all__ = ["SaliencyWriter", "map_affine", "map_on_input_grid", "predict_with_saliency"]


def explained_class(run: LoadedRun, prob: Any) -> int:
    """The class a map explains: the positive one for binary models, else the predicted one."""
    return 1 if run.model.task == "binary" else run.decide(np.asarray(prob))


def unnormalise(run: LoadedRun, x: torch.Tensor) -> torch.Tensor:
    """The ``[0, 1]`` image of a normalised batch (the inverse of ``Preprocessor.normalize``)."""
    spec = run.pre.spec
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(spec.std, dtype=torch.float32).view(shape)
    if mean.shape[1] != x.shape[1]:
        mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
    return (x.detach().float().cpu() * std + mean).clamp(0, 1)


def _corner_text(run: LoadedRun, prob: Any, cls: int, method: str) -> list[str]:
    prob = np.asarray(prob, dtype=np.float64)
    predicted = run.predicted_label(prob)
    p = prob[run.label_names.index(predicted)] if predicted in run.label_names else float(prob.max())
    return [f"predicted: {predicted} (p = {p:.3f})", f"{method}: evidence for '{run.label_names[cls]}'"]


def _input_volume(item_paths: list[str], canonical: bool):
    """The volume a 3D input was read from: a NIfTI file, or a DICOM series (its files, or its folder)."""
    from medtransfer.io import is_nifti_path, read_nifti
    from medtransfer.io.series import list_files, read_series

    path = item_paths[0]
    if len(item_paths) == 1 and is_nifti_path(path):
        return read_nifti(path, canonical=canonical)
    paths = [str(p) for p in list_files(path)] if os.path.isdir(path) else item_paths
    return read_series(paths, strict=False)


def map_affine(item_paths: list[str], size: int) -> np.ndarray:
    """World (RAS, mm) affine of a ``size``³ map of a volume input: the input's affine in the closest RAS
    axis order (as the model read it), scaled for the resize to ``size`` (trilinear, corners not aligned:
    map voxel ``j`` covers input voxels around ``(j + 0.5) · n / size - 0.5``)."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    vol = _input_volume(item_paths, canonical=True)
    shape = np.asarray(vol.array.shape[:3])
    ornt = io_orientation(vol.affine)
    canonical = vol.affine @ inv_ornt_aff(ornt, tuple(int(s) for s in shape))
    n = np.empty(3)
    n[ornt[:, 0].astype(int)] = shape  # the array's shape once reordered to RAS
    scale = n / float(size)
    resize = np.eye(4)
    resize[:3, :3] = np.diag(scale)
    resize[:3, 3] = 0.5 * scale - 0.5
    return canonical @ resize


def map_on_input_grid(saliency: np.ndarray, item_paths: list[str]) -> Any:
    """A ``size``³ map of a volume input as a ``nibabel.Nifti1Image`` on the input's own grid: its shape and
    affine (a NIfTI file's as stored; a DICOM series' RAS affine), trilinearly resampled from the model's
    grid (:func:`map_affine`)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    source = nib.Nifti1Image(np.asarray(saliency, dtype=np.float32), map_affine(item_paths, saliency.shape[0]))
    vol = _input_volume(item_paths, canonical=False)
    target = (tuple(int(s) for s in vol.array.shape[:3]), vol.affine)
    out = resample_from_to(source, target, order=1, mode="nearest")
    return nib.Nifti1Image(np.asarray(out.dataobj, dtype=np.float32), vol.affine)


def _safe_name(key: str, root: Path | None) -> str:
    """A flat file name for an input: its path below ``root`` with separators as ``__``."""
    rel = os.path.relpath(key, root) if root is not None and os.path.isabs(key) else key
    return re.sub(r"[^0-9A-Za-z._-]+", "__", rel.replace(os.sep, "__")).strip("_") or "input"


class SaliencyWriter:
    """The ``on_batch`` hook of :func:`~medtransfer.inference.batch.run_batch` (see the module docstring).

    A map that cannot be made is logged and counted in ``failed``; the batch goes on.
    """

    def __init__(self, run: LoadedRun, out_dir: str | os.PathLike[str], method: str = "gradcam",
                 input_root: str | os.PathLike[str] | None = None):
        self.run, self.method = run, method
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.root = Path(input_root).resolve() if input_root is not None else None
        self.explainer = SaliencyExplainer(run.model, method, run.checkpoint.get("backbone"))
        self.written: list[Path] = []
        self.failed = 0

    def __call__(self, x: torch.Tensor, items: list[WorkItem], probs: Any) -> None:
        classes = [explained_class(self.run, p) for p in probs]
        try:
            maps = self.explainer.explain(x, classes)
        except Exception as exc:  # the predictions of the batch are written regardless
            self.failed += len(items)
            logger.warning("saliency maps of a batch of %d not made: %s: %s", len(items), type(exc).__name__, exc)
            return
        images = unnormalise(self.run, x)
        for item, image, sal, prob, cls in zip(items, images, maps, probs, classes):
            try:
                self._write(item, image.numpy(), sal.numpy(), prob, cls)
            except Exception as exc:  # one input's map never stops the batch
                self.failed += 1
                logger.warning("saliency map of %s not written: %s: %s", item.key, type(exc).__name__, exc)

    def _write(self, item: WorkItem, image: np.ndarray, sal: np.ndarray, prob: Any, cls: int) -> None:
        name = _safe_name(str(Path(item.key).resolve()) if os.path.exists(item.key) else item.key, self.root)
        png = saliency_overlay(image, sal, _corner_text(self.run, prob, cls, self.method))
        self.written.append(write_bytes_atomic(self.out_dir / f"{name}.png", png_bytes(png)))
        if sal.ndim == 3:
            import nibabel as nib

            nii = map_on_input_grid(sal, item.paths)
            target = self.out_dir / f"{name}.nii.gz"
            tmp = target.with_name(f".{target.name}.tmp.nii.gz")
            nib.save(nii, str(tmp))
            os.replace(tmp, target)
            self.written.append(target)


def predict_with_saliency(run_dir: str | os.PathLike[str], input_dir: str | os.PathLike[str],
                          out_csv: str | os.PathLike[str], saliency_dir: str | os.PathLike[str],
                          method: str = "gradcam", device: str = "auto", options: PredictOptions | None = None,
                          **overrides: Any) -> BatchSummary:
    """``predict_folder`` that also writes a saliency map per predicted input into ``saliency_dir``
    (``options`` / ``overrides``: :class:`~medtransfer.inference.batch.PredictOptions`)."""
    run = load_run(run_dir, device)
    writer = SaliencyWriter(run, saliency_dir, method, input_root=input_dir)
    summary = run_batch(run, input_dir, out_csv, options, on_batch=writer, **overrides)
    logger.info("%d saliency files -> %s (%d failed)", len(writer.written), saliency_dir, writer.failed)
    return summary
