"""Run a trained model over a folder of DICOM files: one output row per input file, always.

Every file under the folder (recursively, with or without a ``.dcm`` suffix) gets a row with a
status: ``ok`` (predicted), ``skipped`` (a valid DICOM object the model does not take: SR,
RTSTRUCT, multi-frame into a 2D model, …) or ``error`` (unreadable, not DICOM, broken pixel
data), and a reason. One bad file never stops the batch. The CSV is written atomically. No
patient names or birth dates are written.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.config import RunConfig, config_from_dict
from medtransfer.data.preprocess import Preprocessor, PreprocessSpec
from medtransfer.errors import MedTransferError
from medtransfer.inference.batch import BatchSummary, SeriesFilter, run_batch
from medtransfer.transfer import EnsembleModel, TransferModel

logger = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run directory, ready to predict."""

    model: TransferModel | EnsembleModel
    pre: Preprocessor
    label_names: list[str]
    config: RunConfig
    device: torch.device
    checkpoint: dict[str, Any] = field(repr=False, default_factory=dict)
    run_dir: str = ""

    @property
    def threshold(self) -> float | None:
        """The binary operating point chosen on validation during training (None: argmax)."""
        op = self.checkpoint.get("operating_point") or {}
        t = op.get("threshold")
        return float(t) if isinstance(t, (int, float)) and len(self.label_names) == 2 else None

    def decide(self, prob) -> int:
        """Class index for one probability row: the validation operating point for binary models, the
        median grade for ordinal ones, else the most probable class."""
        t = self.threshold
        if t is not None:
            return int(prob[1] >= t)
        if self.model.task == "ordinal":  # the median grade, as the training report counted it
            from medtransfer.metrics.classification import ordinal_grade

            return int(ordinal_grade(np.asarray(prob, dtype=np.float64)[None])[0])
        return int(prob.argmax())

    def predicted_label(self, prob) -> str:
        """The predicted class name; for multi-label models the names at or above their
        per-label thresholds chosen on validation, joined by ';'."""
        if self.model.task != "multilabel":
            return self.label_names[self.decide(prob)]
        per_label = (self.checkpoint.get("operating_point") or {}).get("threshold") or {}
        return ";".join(n for n, p in zip(self.label_names, prob) if p >= float(per_label.get(n, 0.5)))


def load_run(run_dir: str | os.PathLike[str], device: str = "auto") -> LoadedRun:
    """Rebuild the model of a run directory from its self-describing ``model.pt`` (no network)."""
    from medtransfer.backbones import get_weight_spec, load_backbone
    from medtransfer.train.finetune import CHECKPOINT_FORMAT, pick_device

    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise MedTransferError(
            f"'{run_dir}' is not a medtransfer run directory (no model.pt). "
            "Pass the --out folder of a finished 'medtransfer finetune'."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MedTransferError(f"{path} has format {ckpt.get('format')!r}; expected {CHECKPOINT_FORMAT!r}.")
    cfg = config_from_dict(ckpt["config"])
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])

    def member() -> TransferModel:
        backbone, _ = load_backbone(get_weight_spec(ckpt["backbone"]), spec.channels, "none")
        return TransferModel(backbone, int(ckpt["num_classes"]), cfg.model.head, cfg.model.dropout, cfg.model.task)

    # An ensemble's weights name its members ("members.<i>."): as many as were trained, which a time
    # limit may have cut below train.ensemble.
    n_members = len({k.split(".")[1] for k in ckpt["state_dict"] if k.startswith("members.")})
    model = EnsembleModel([member() for _ in range(n_members)]) if n_members else member()
    model.load_state_dict(ckpt["state_dict"])
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedRun(model, Preprocessor(spec), list(ckpt["label_names"]), cfg, dev, ckpt, str(run_dir))


def predict_folder(
    run_dir: str | os.PathLike[str],
    input_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
    *,
    workers: int = 0,
    resume: bool = False,
    shard: tuple[int, int] | None = None,
    series_filter: SeriesFilter | None = None,
    parquet: bool = False,
    study_json_dir: str | os.PathLike[str] | None = None,
    patient_fields: bool = False,
) -> BatchSummary:
    """Predict every file under ``input_dir`` with the model of ``run_dir``; write ``out_csv``.

    See :mod:`medtransfer.inference.batch` for streaming, workers, ``resume`` and ``shard``.
    """
    run = load_run(run_dir, device)
    return run_batch(run, input_dir, out_csv, batch_size=batch_size, workers=workers, resume=resume,
                     shard=shard, series_filter=series_filter, parquet=parquet, progress=progress,
                     study_json_dir=study_json_dir, patient_fields=patient_fields)


PredictSummary = BatchSummary
