"""Batch prediction from a segmentation run directory: NIfTI masks, DICOM SEG, structure volumes."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.errors import DataError
from medtransfer.io import is_nifti_path
from medtransfer.run.checkpoint import SEG_MODEL_FORMAT, read_checkpoint
from medtransfer.segmentation.sliding import segment_volume

logger = logging.getLogger(__name__)


def load_run(run_dir: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and checkpoint dict of a segmentation run (``model.pt``, loaded with ``weights_only``)."""
    from medtransfer.segmentation.model import build_segmentation_model

    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise DataError(f"'{run_dir}' is not a run directory: {path} not found. Train with 'medtransfer segment train'.")
    ckpt = read_checkpoint(path, (SEG_MODEL_FORMAT,), f"the segmentation model of run '{run_dir}'")
    m = ckpt["model"]
    model, _ = build_segmentation_model(m["encoder"], dims=m["dims"], in_channels=m["in_channels"],
                                        num_classes=len(ckpt["label_names"]), weights="none",
                                        decoder_channels=m["decoder_channels"], inflate=m.get("inflate", "average"),
                                        stages=m.get("stages", 0))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    return model, ckpt


def _expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str, Any]]:
    """Each input as ``(name, kind, source)``: NIfTI files, and DICOM series found in folders."""
    from medtransfer.io.series import find_series

    items: list[tuple[str, str, Any]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file() and is_nifti_path(p):
            items.append((str(p), "nifti", p))
        elif p.is_dir():
            niftis = sorted(q for q in p.iterdir() if q.is_file() and is_nifti_path(q))
            if niftis:
                items += [(str(q), "nifti", q) for q in niftis]
                continue
            series, problems = find_series(p)
            if not series:
                why = f"; {len(problems)} unreadable file(s), e.g. {problems[0].message}" if problems else ""
                items.append((str(p), "error", f"no NIfTI file or DICOM image series found{why}"))
            for s in series:
                name = str(p) if len(series) == 1 else f"{p}#{s.series_instance_uid}"
                items.append((name, "dicom", s))
        elif p.exists():
            items.append((str(p), "error", "unsupported input: give a .nii/.nii.gz file or a folder with a DICOM series"))
        else:
            items.append((str(p), "error", "not found"))
    return items


def _out_stem(name: str, kind: str, source: Any, used: set[str]) -> str:
    if kind == "nifti":
        from medtransfer.segmentation.data import case_id_of

        stem = case_id_of(source)
    else:
        stem = Path(name.split("#")[0]).name or "series"
        if "#" in name:
            stem += "_" + source.series_instance_uid.rsplit(".", 1)[-1]
    base, i = stem, 1
    while stem in used:
        i += 1
        stem = f"{base}_{i}"
    used.add(stem)
    return stem


def predict_segmentation(
    run_dir: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    dicom_seg: bool = True,
) -> list[dict[str, Any]]:
    """Segment NIfTI files and DICOM series folders with the model in ``run_dir``.

    Writes ``<name>_seg.nii.gz`` per input (label map, with the input's own affine and axis order),
    ``<name>_seg.dcm`` (DICOM SEG referencing the source instances) when the input was DICOM and
    ``dicom_seg`` is true, and ``volumes.csv``: one row per input with ``status`` ok/error,
    ``reason`` and the volume of each structure in mL. A bad input never stops the batch.
    Returns the rows.
    """
    from medtransfer.metrics._utils import write_csv_atomic
    from medtransfer.segmentation.writers import write_dicom_seg, write_nifti_mask

    model, ckpt = load_run(run_dir)
    prep, names = ckpt["preprocessing"], list(ckpt["label_names"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for name, kind, source in _expand_inputs(inputs):
        row: dict[str, Any] = {"input": name, "status": "error", "reason": "", "mask_nifti": "", "mask_dicom_seg": ""}
        if kind == "error":
            row["reason"] = source
            rows.append(row)
            continue
        try:
            if kind == "nifti":
                from medtransfer.io import read_nifti

                vol = read_nifti(source)
            else:
                from medtransfer.io import read_series

                vol = read_series(source.paths)
            if vol.array.ndim != 3:
                raise DataError(f"expected a 3D image, got shape {vol.array.shape}")
            mask = segment_volume(model, vol, prep)
            stem = _out_stem(name, kind, source, used)
            row["mask_nifti"] = str(write_nifti_mask(out / f"{stem}_seg.nii.gz", mask, vol,
                                                     source if kind == "nifti" else None))
            if kind == "dicom" and dicom_seg:
                if mask.any():
                    row["mask_dicom_seg"] = str(write_dicom_seg(out / f"{stem}_seg.dcm", mask, vol, names))
                else:
                    row["reason"] = "no structure found: empty mask, no DICOM SEG written"
            voxel_ml = float(np.prod(vol.spacing)) / 1000.0
            for k, label in enumerate(names[1:], start=1):
                row[f"volume_ml_{label}"] = round(float((mask == k).sum()) * voxel_ml, 4)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the batch; the row says why
            row["reason"] = f"{type(exc).__name__}: {exc}"
            logger.warning("%s: %s", name, row["reason"])
        rows.append(row)
    columns = ["input", "status", "reason"] + [f"volume_ml_{n}" for n in names[1:]] + ["mask_nifti", "mask_dicom_seg"]
    write_csv_atomic(out / "volumes.csv", rows, columns)
    n_ok = sum(r["status"] == "ok" for r in rows)
    logger.info("segmented %d of %d input(s); table: %s", n_ok, len(rows), out / "volumes.csv")
    return rows
