"""Run a trained model over a folder of DICOM files: one output row per input file, always.

Every file under the folder (recursively, with or without a ``.dcm`` suffix) gets a row with a
status: ``ok`` (predicted), ``skipped`` (a valid DICOM object the model does not take: SR,
RTSTRUCT, multi-frame into a 2D model, …) or ``error`` (unreadable, not DICOM, broken pixel
data), and a reason. One bad file never stops the batch. The CSV is written atomically. No
patient names or birth dates are written.
"""
from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medtransfer.config import RunConfig, config_from_dict
from medtransfer.data.preprocess import Preprocessor, PreprocessSpec, UnsupportedImageError
from medtransfer.errors import MedTransferError
from medtransfer.io import MedIOError, NoPixelDataError, read_dicom_header
from medtransfer.transfer import TransferModel

logger = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run directory, ready to predict."""

    model: TransferModel
    pre: Preprocessor
    label_names: list[str]
    config: RunConfig
    device: torch.device
    checkpoint: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def threshold(self) -> float | None:
        """The binary operating point chosen on validation during training (None: argmax)."""
        op = self.checkpoint.get("operating_point") or {}
        t = op.get("threshold")
        return float(t) if isinstance(t, (int, float)) and len(self.label_names) == 2 else None

    def decide(self, prob) -> int:
        """Class index for one probability row: the validation operating point for binary models."""
        t = self.threshold
        if t is not None:
            return int(prob[1] >= t)
        return int(prob.argmax())


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
    backbone, _ = load_backbone(get_weight_spec(ckpt["backbone"]), spec.channels, "none")
    model = TransferModel(backbone, int(ckpt["num_classes"]), cfg.model.head, cfg.model.dropout)
    model.load_state_dict(ckpt["state_dict"])
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedRun(model, Preprocessor(spec), list(ckpt["label_names"]), cfg, dev, ckpt)


def iter_files(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder``, recursively, in a stable (sorted) order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def _sop_uid(path: Path) -> str:
    try:
        return str(read_dicom_header(path).get("SOPInstanceUID", "") or "")
    except Exception:
        return ""


@dataclass
class PredictSummary:
    out_csv: Path
    counts: Counter
    rows: list[dict[str, Any]]

    @property
    def n_ok(self) -> int:
        return self.counts.get("ok", 0)


def predict_folder(
    run_dir: str | os.PathLike[str],
    input_dir: str | os.PathLike[str],
    out_csv: str | os.PathLike[str],
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
) -> PredictSummary:
    """Predict every file under ``input_dir`` with the model of ``run_dir``; write ``out_csv``."""
    run = load_run(run_dir, device)
    folder = Path(input_dir)
    if not folder.is_dir():
        raise MedTransferError(f"Input folder '{folder}' does not exist or is not a folder.")
    files = list(iter_files(folder))
    prob_cols = [f"prob_{n}" for n in run.label_names]
    rows: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([t for _, t in pending]).to(run.device)
        with torch.no_grad():
            probs = run.model.probabilities(run.model(run.pre.normalize(x))).cpu().numpy()
        for (row, _), p in zip(pending, probs):
            row.update({c: f"{v:.6f}" for c, v in zip(prob_cols, p)})
            row["predicted"] = run.label_names[run.decide(p)]
        pending.clear()

    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting", total=len(files))
        for f in files:
            row: dict[str, Any] = {"path": str(f), "status": "ok", "reason": "", "sop_instance_uid": ""}
            rows.append(row)
            try:
                tensor, meta = run.pre.load_dicom_with_meta(str(f))
                row["sop_instance_uid"] = meta.get("sop_instance_uid", "")
                pending.append((row, tensor))
            except (NoPixelDataError, UnsupportedImageError) as exc:
                row.update(status="skipped", reason=exc.reason, sop_instance_uid=_sop_uid(f))
            except MedIOError as exc:
                row.update(status="error", reason=exc.reason, sop_instance_uid=_sop_uid(f))
            except Exception as exc:  # one bad file never stops the batch
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}", sop_instance_uid=_sop_uid(f))
            if len(pending) >= batch_size:
                flush()
            bar.advance(task)
        flush()

    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fields = ["path", "status", "reason", "sop_instance_uid", *prob_cols, "predicted"]
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
    counts = Counter(r["status"] for r in rows)
    logger.info("predicted %d files: %s", len(rows), dict(counts))
    return PredictSummary(out, counts, rows)
