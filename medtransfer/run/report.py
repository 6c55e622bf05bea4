"""The last page of a run: the saliency gallery of its test predictions and ``report.html``.

Written once, after ``metrics.json`` and ``model.pt``, by training, ``evaluate`` and ``segment
train``: :func:`finish_report`. The gallery (binary runs) shows the most confident true positives,
false positives and false negatives of a report folder's ``predictions_<split>.csv`` with their
Grad-CAM maps, as ``plots/saliency_gallery.png`` + ``.json``.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.errors import MedTransferError
from medtransfer.metrics.html_report import write_html_report
from medtransfer.evaluation.saliency import SaliencyExplainer, cam_layer_names, gallery_image, saliency_overlay
from medtransfer.run.loaded import LoadedRun, load_run
from medtransfer.utils.atomic import write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)

GALLERY_GROUPS = (("TP", "true positives"), ("FP", "false positives"), ("FN", "false negatives"))


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def load_input(run: LoadedRun, path: str, npz_cache: dict[str, Any]) -> torch.Tensor:
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
            image = load_input(run, r["path"], cache)
            x = run.pre.normalize(image[None].to(run.device))
            sal = explainer.explain(x, 1)[0].numpy()
            prob = float(r[f"prob_{run.label_names[1]}"])
            tiles.append(saliency_overlay(image.numpy(), sal, [f"{key}: p({run.label_names[1]}) = {prob:.3f}"]))
            items.append({"group": key, "path": r["path"], "probability": prob,
                          "label": run.label_names[int(r["label"])], "predicted": run.label_names[int(r["predicted"])]})
        groups.append((f"{title}\n({len(tiles)} most confident)", tiles))
    png = write_bytes_atomic(report / "plots" / "saliency_gallery.png", png_bytes(gallery_image(groups)))
    layer = None if method == "occlusion" else _layer(run)
    write_json_atomic(png.with_suffix(".json"), {"split": split, "method": method, "layer": layer,
                                                 "explained_class": run.label_names[1], "items": items})
    return png


def _layer(run: LoadedRun) -> str:
    """The Grad-CAM layer the gallery used, as a module name inside the backbone."""
    return cam_layer_names(run.model, run.checkpoint["backbone"])[0].split("backbone.", 1)[1]


def finish_report(run: LoadedRun | str | os.PathLike[str], report_dir: str | os.PathLike[str] | None = None, *,
                  gallery: bool = True, method: str = "gradcam") -> Path:
    """The saliency gallery of a classification report folder (``report_dir``, default the run directory)
    and its ``report.html`` from everything in it — the last files a run writes. ``run``: a loaded run
    (e.g. the model just trained) or its directory. A gallery that cannot be made (e.g. a backbone
    truncated below its Grad-CAM layer) is logged, and the page written without it."""
    report = Path(report_dir) if report_dir is not None else Path(run.run_dir if isinstance(run, LoadedRun) else run)
    if gallery:
        try:
            write_saliency_gallery(run, report, method=method)
        except MedTransferError as exc:
            logger.warning("saliency gallery not written: %s", exc)
    return write_html_report(report)
