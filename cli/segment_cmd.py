"""``medtransfer segment``: train a segmentation model and segment NIfTI / DICOM inputs.

Thin: parses options and calls :func:`medtransfer.segmentation.train_segmentation` and
:func:`medtransfer.segmentation.predict_segmentation`. Exit codes: 0 success; 1 the job failed;
2 bad usage or configuration.
"""
from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from medtransfer.cli._console import console
from medtransfer.cli._errors import ErrorHandlingGroup

segment_app = typer.Typer(
    cls=ErrorHandlingGroup,
    name="segment",
    help=(
        "Segmentation transfer: a U-Net decoder on a registered (pretrained) encoder, trained with Dice + "
        "cross-entropy on image/mask pairs (Decathlon folders or DICOM + DICOM SEG); predicts NIfTI masks, "
        "DICOM SEG and structure volumes."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class SegModality(str, Enum):
    mri = "mri"
    ct = "ct"


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    root = logging.getLogger("medtransfer")
    root.handlers[:] = [RichHandler(console=console, show_path=False, show_time=False, markup=False)]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


@segment_app.command()
def train(
    modality: SegModality = typer.Option(SegModality.mri, "--modality", "-m",
                                         help="Preset: mri (z-score on nonzero voxels, 1 mm) or ct (HU window, 1.5 mm)."),
    data: Path = typer.Option(..., "--data", "-d",
                              help="Decathlon folder (imagesTr/ + labelsTr/, dataset.json optional), images/ + labels/ "
                                   "folders with matching names, or a folder of DICOM series with DICOM SEG files."),
    out: Path = typer.Option(Path("runs/segment"), "--out", "-o", help="Run directory to write (model.pt, metrics.json, ...)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file merged over the preset."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override, e.g. --set train.epochs=5 --set model.dims=3."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w",
                                          help="Encoder weights: pretrained, none (random init) or a checkpoint file."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e",
                                          help="Registered encoder, e.g. efficientnet_lite0.in1k, tiny_cnn3d.random "
                                               "(see 'medtransfer backbones')."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last.pt (its own config)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out (otherwise a folder that holds files is refused)."),
) -> None:
    """Train a segmentation model; writes a self-describing run directory.

    Several GPUs or machines: launch the same command with torchrun (DDP).

    Examples:

      medtransfer segment train --modality mri --data Task04_Hippocampus --out runs/hippo --set train.epochs=10

      medtransfer segment train --data Task04_Hippocampus --out runs/hippo --resume    # after an interruption
    """
    from medtransfer.segmentation.config import load_seg_config
    from medtransfer.segmentation.train import train_segmentation

    _setup_logging(quiet)
    model = {k: v for k, v in {"encoder": encoder, "weights": weights}.items() if v is not None}
    cfg = load_seg_config(modality.value, config, set_, data={"path": str(data)}, model=model)
    metrics = train_segmentation(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet)
    split = "test" if "test" in metrics else "val"
    dice = (metrics.get(split) or {}).get("mean_dice")
    console.print(f"run directory: {out}" + (f"; mean Dice ({split}) {dice:.4f}" if dice is not None else ""))


@segment_app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="Run directory from 'medtransfer segment train' (holds model.pt)."),
    inputs: List[Path] = typer.Argument(..., help="NIfTI files, folders of NIfTI files, or DICOM series folders."),
    out: Path = typer.Option(Path("segmentations"), "--out", "-o", help="Output folder for masks and volumes.csv."),
    dicom_seg: bool = typer.Option(True, "--dicom-seg/--no-dicom-seg", help="Also write DICOM SEG for DICOM inputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Segment inputs: NIfTI masks with the input's affine, DICOM SEG for DICOM series, and volumes.csv
    (one row per input, structure volumes in mL). Exit code 1 if any input failed."""
    from medtransfer.segmentation.inference import predict_segmentation

    _setup_logging(quiet)
    rows = predict_segmentation(run_dir, inputs, out, dicom_seg=dicom_seg)
    failed = [r for r in rows if r["status"] != "ok"]
    console.print(f"{len(rows) - len(failed)} of {len(rows)} input(s) segmented; table: {out / 'volumes.csv'}")
    for r in failed[:10]:
        console.print(f"  failed: {r['input']}: {r['reason']}", highlight=False)
    if failed:
        raise typer.Exit(1)
