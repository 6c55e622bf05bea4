"""Does the data-driven recipe keep its 20-minute promise on the largest MedMNIST-sized files?

The shared folder holds small MedMNIST files only; the largest MedMNIST 2D sets are far bigger
(TissueMNIST: 165,466 / 23,640 / 47,280 images; PathMNIST: 89,996 / 10,004 / 7,180, colour). This
builds files of exactly those split sizes from the real PneumoniaMNIST images (drawn with
replacement; random class labels made learnable by a class-dependent bright band, so the AUC is
meaningless; only the time is measured), then runs exactly what a user runs:

    medtransfer finetune --data FILE.npz --out DIR

and records the wall time, the recipe's estimate and what ``train.time_limit_minutes`` cut.

Usage::

    python benchmarks/recipe_scale.py            # both profiles (~20 min on a 2-core CPU)
    python benchmarks/recipe_scale.py tissue     # one of them

Writes ``benchmarks/results/recipe_scale.json``. Generated files go to a temporary folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "medmnist"
RESULTS = ROOT / "benchmarks" / "results" / "recipe_scale.json"

# name: (train, val, test, classes, colour) — the split sizes of the two largest MedMNIST 2D files.
PROFILES = {
    "tissue": (165_466, 23_640, 47_280, 8, False),
    "path": (89_996, 10_004, 7_180, 9, True),
}


def build(name: str, path: Path) -> None:
    n_train, n_val, n_test, classes, colour = PROFILES[name]
    src = np.load(DATA / "pneumoniamnist.npz")
    pool = np.concatenate([src[f"{s}_images"] for s in ("train", "val", "test")])
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        x = pool[rng.integers(0, len(pool), n)].astype(np.int16)
        y = rng.integers(0, classes, (n, 1)).astype(np.uint8)
        for c in range(classes):
            rows = slice(3 * c, 3 * c + 3)
            x[y[:, 0] == c, rows, :] += 40
        x = np.clip(x, 0, 255).astype(np.uint8)
        if colour:
            tint = rng.uniform(0.7, 1.0, (n, 1, 1, 3))
            x = (x[..., None] * tint).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    np.savez(path, **arrays)


def run(name: str, tmp: Path) -> dict:
    npz = tmp / f"{name}_like.npz"
    build(name, npz)
    out = tmp / f"{name}_run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "medtransfer", "finetune", "--data", str(npz), "--out", str(out)],
                          capture_output=True, text=True)
    minutes = (time.perf_counter() - t0) / 60
    if proc.returncode != 0:
        raise SystemExit(f"{name}: medtransfer finetune exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "history.csv", newline="") as fh:
        history = [{"epoch": int(r["epoch"]), "phase": r["phase"], "seconds": round(float(r["seconds"]), 1)}
                   for r in csv.DictReader(fh)]
    cfg = (out / "config.yaml").read_text()
    from medtransfer.data.profile import plan_recipe, profile_npz

    plan = plan_recipe(profile_npz(npz))
    n_train, n_val, n_test, classes, colour = PROFILES[name]
    return {
        "split_sizes": [n_train, n_val, n_test], "classes": classes, "colour": colour,
        "minutes": minutes, "estimated_minutes": plan.estimated_minutes, "size": plan.size,
        "finetune_epochs": plan.finetune_epochs, "train_fraction": plan.train_fraction, "members": plan.members,
        "time_limit": metrics.get("time_limit"), "eval_seconds": metrics.get("eval_seconds"),
        "test_auc_sanity": metrics["test"]["auc"],  # learnable synthetic band: > 0.5 shows training ran
        "run_minutes": metrics.get("minutes"), "epochs": history,
        "val_images": metrics["val"]["n"], "val_max": plan.val_max,
        "time_limit_minutes": plan.time_limit_minutes, "config_has_limit": "time_limit_minutes" in cfg,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles", nargs="*", choices=[*PROFILES, []], help="default: all")
    args = ap.parse_args()
    if not (DATA / "pneumoniamnist.npz").is_file():
        raise SystemExit(f"{DATA / 'pneumoniamnist.npz'} not found (set MEDTRANSFER_SHARED_DATA).")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.profiles or list(PROFILES):
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run(name, Path(tmp))
        r = results[name]
        print(f"{name}: {r['minutes']:.1f} min (estimate {r['estimated_minutes']:.1f}), time limit {r['time_limit']}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
