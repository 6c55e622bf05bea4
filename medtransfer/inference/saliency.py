"""Saliency for trained runs: maps beside batch predictions, and the report's gallery.

* :class:`SaliencyWriter` is the ``on_batch`` hook of :func:`medtransfer.inference.batch.run_batch`:
  per predicted input it writes ``<name>.png`` (the image as the model saw it, the map on top, the
  predicted class and its probability in the corner) and, for 3D models, ``<name>.nii.gz`` (the map
  resampled onto the input's grid: its shape and affine).
* :func:`predict_with_saliency` is ``predict_folder`` with that hook.
* :func:`write_saliency_gallery` picks the most confident true positives, false positives and false
  negatives of a report folder's ``predictions_<split>.csv``, explains them with the run's model and
  writes ``plots/saliency_gallery.png`` + ``.json``, which ``report.html`` shows.

What is explained: for binary models always the positive class (where the evidence for the finding
lies, also on a negative call), otherwise the predicted class.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.inference.batch import BatchSummary, WorkItem, run_batch
from medtransfer.inference.predict import LoadedRun, load_run
from medtransfer.metrics._utils import write_bytes_atomic, write_json_atomic
from medtransfer.metrics.saliency import SaliencyExplainer, gallery_image, saliency_overlay

logger = logging.getLogger(__name__)

__all__ = ["SaliencyWriter", "finish_report", "map_affine", "map_on_input_grid", "predict_with_saliency",
           "write_saliency_gallery"]

GALLERY_GROUPS = (("TP", "true positives"), ("FP", "false positives"), ("FN", "false negatives"))


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


def _png_bytes(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
        self.written.append(write_bytes_atomic(self.out_dir / f"{name}.png", _png_bytes(png)))
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
                          method: str = "gradcam", device: str = "auto", **batch_kw: Any) -> BatchSummary:
    """``predict_folder`` that also writes a saliency map per predicted input into ``saliency_dir``
    (``batch_kw``: the options of :func:`~medtransfer.inference.batch.run_batch`)."""
    run = load_run(run_dir, device)
    writer = SaliencyWriter(run, saliency_dir, method, input_root=input_dir)
    summary = run_batch(run, input_dir, out_csv, on_batch=writer, **batch_kw)
    logger.info("%d saliency files -> %s (%d failed)", len(writer.written), saliency_dir, writer.failed)
    return summary


def _load_input(run: LoadedRun, path: str, npz_cache: dict[str, Any]) -> torch.Tensor:
    """The ``[0, 1]`` model input of a predictions-CSV path (files as in training; ``file.npz#split/i``)."""
    if "#" in path and path.split("#", 1)[0].endswith(".npz"):
        file, ref = path.split("#", 1)
        split, index = ref.rsplit("/", 1)
        if file not in npz_cache:
            npz_cache[file] = np.load(file)
        array = npz_cache[file][f"{split}_images"][int(index)]
        return run.pre.load_npz_volume(array) if run.pre.spec.dims == 3 else run.pre.load_npz(array)
    return run.pre.load_volume(path) if run.pre.spec.dims == 3 else run.pre.load_image(path)


def gallery_rows(predictions_csv: str | os.PathLike[str], positive: str, per_group: int = 3) -> dict[str, list]:
    """The most confident ``TP``, ``FP`` (highest positive probability) and ``FN`` (lowest) rows of a binary
    predictions table (``label``/``predicted`` are class indices, ``prob_<positive>`` the score)."""
    with open(predictions_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    col = f"prob_{positive}"
    score = {id(r): float(r[col]) for r in rows}
    tp = [r for r in rows if r["label"] == "1" and r["predicted"] == "1"]
    fp = [r for r in rows if r["label"] == "0" and r["predicted"] == "1"]
    fn = [r for r in rows if r["label"] == "1" and r["predicted"] == "0"]
    return {"TP": sorted(tp, key=lambda r: -score[id(r)])[:per_group],
            "FP": sorted(fp, key=lambda r: -score[id(r)])[:per_group],
            "FN": sorted(fn, key=lambda r: score[id(r)])[:per_group]}


def write_saliency_gallery(run: LoadedRun | str | os.PathLike[str], report_dir: str | os.PathLike[str], *,
                           split: str = "test", method: str = "gradcam", per_group: int = 3) -> Path | None:
    """``plots/saliency_gallery.png`` and ``.json`` in ``report_dir`` from its ``predictions_<split>.csv``
    (binary runs; see :func:`gallery_rows`). Returns the PNG, or None when there is nothing to show (no
    such table, not a binary task, no TP/FP/FN). ``run`` is a loaded run or its directory."""
    report = Path(report_dir)
    table = report / f"predictions_{split}.csv"
    run = run if isinstance(run, LoadedRun) else load_run(run, "cpu")
    if not table.is_file() or run.model.task != "binary":
        logger.info("no saliency gallery: %s", "not a binary model" if table.is_file() else f"no {table.name}")
        return None
    chosen = gallery_rows(table, run.label_names[1], per_group)
    if not any(chosen.values()):
        return None
    explainer = SaliencyExplainer(run.model, method, run.checkpoint.get("backbone"))
    cache: dict[str, Any] = {}
    groups, items = [], []
    for key, title in GALLERY_GROUPS:
        tiles = []
        for r in chosen[key]:
            image = _load_input(run, r["path"], cache)
            x = run.pre.normalize(image[None].to(run.device))
            sal = explainer.explain(x, 1)[0].numpy()
            prob = float(r[f"prob_{run.label_names[1]}"])
            tiles.append(saliency_overlay(image.numpy(), sal, [f"{key}: p({run.label_names[1]}) = {prob:.3f}"]))
            items.append({"group": key, "path": r["path"], "probability": prob,
                          "label": run.label_names[int(r["label"])], "predicted": run.label_names[int(r["predicted"])]})
        groups.append((f"{title}\n({len(tiles)} most confident)", tiles))
    png = write_bytes_atomic(report / "plots" / "saliency_gallery.png", _png_bytes(gallery_image(groups)))
    layer = None if method == "occlusion" else _layer(run)
    write_json_atomic(png.with_suffix(".json"), {"split": split, "method": method, "layer": layer,
                                                 "explained_class": run.label_names[1], "items": items})
    return png


def _layer(run: LoadedRun) -> str | None:
    from medtransfer.backbones import get_weight_spec

    return get_weight_spec(run.checkpoint["backbone"]).cam_layer


def finish_report(run_dir: str | os.PathLike[str], report_dir: str | os.PathLike[str] | None = None, *,
                  gallery: bool = True, method: str = "gradcam") -> Path:
    """Add the saliency gallery to a classification report folder (``report_dir``, default the run
    directory) and write its ``report.html`` again from everything now in it. A gallery that cannot be
    made (e.g. a backbone truncated below its Grad-CAM layer) is logged, and the page written without it."""
    from medtransfer.errors import MedTransferError
    from medtransfer.metrics.html_report import write_html_report

    report = Path(report_dir) if report_dir is not None else Path(run_dir)
    if gallery:
        try:
            write_saliency_gallery(run_dir, report, method=method)
        except MedTransferError as exc:
            logger.warning("saliency gallery not written: %s", exc)
    return write_html_report(report)
