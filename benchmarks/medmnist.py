"""MedMNIST with medtransfer's default recipe, beside the published MedMNIST v2 table.

For each ``.npz`` the recipe is exactly what ``medtransfer finetune --data FILE.npz`` does with no
other option: the data profile picks the preset and the CPU-budgeted settings; model selection on
the official validation split; the official test split is used once. Reported: test AUC with a 95%
bootstrap CI, test ACC (argmax, MedMNIST's convention), wall time.

Usage::

    python benchmarks/medmnist.py                     # every .npz in ../shared/data/medmnist
    python benchmarks/medmnist.py breastmnist.npz     # some of them

Writes ``benchmarks/results/medmnist.json`` (merging with results already there).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "medmnist"
RESULTS = ROOT / "benchmarks" / "results" / "medmnist.json"

# Published MedMNIST v2 numbers (Yang et al. 2023, Table 3/4): test AUC / ACC.
PUBLISHED = {
    "breastmnist": {"ResNet-18 (28)": [0.901, 0.863], "Google AutoML Vision (best at 28)": [0.919, 0.861]},
    "pneumoniamnist": {"ResNet-18 (28)": [0.944, 0.854], "Google AutoML Vision (best at 28)": [0.991, 0.946]},
    "adrenalmnist3d": {"ResNet-18+3D": [0.827, 0.721], "ResNet-18+ACS": [0.839, 0.754]},
}


def accuracy_argmax(pred_csv: Path) -> float:
    with open(pred_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = [c for c in rows[0] if c.startswith("prob_")]
    names = [c[len("prob_"):] for c in cols]
    hits = [names[int(np.argmax([float(r[c]) for c in cols]))] == r["label"] for r in rows]
    return float(np.mean(hits))


def run_one(npz: Path, out_root: Path, overrides: list[str] | None = None) -> dict:
    from medtransfer.train.choice import finetune_best, recipe_candidates

    # As `medtransfer finetune --data FILE.npz`: the recipe's candidates, the best on validation kept.
    cfgs, profile, plans = recipe_candidates(npz, overrides=overrides)
    t0 = time.perf_counter()
    res = finetune_best(cfgs, npz, out_dir=out_root / npz.stem)
    minutes = (time.perf_counter() - t0) / 60
    selection = res.metrics.get("recipe_selection")
    chosen = selection["chosen"] if selection else next(iter(cfgs))
    cfg, plan = cfgs[chosen], plans[chosen]
    test = res.metrics["test"]
    return {
        "test_auc": test["auc"],
        "test_acc": accuracy_argmax(res.run_dir / "predictions_test.csv"),
        "auc_ci": test.get("auc_ci"),
        "minutes": minutes,
        "n_test": test["n"],
        "recipe": {"size": cfg.data.size, "head_epochs": cfg.train.head_epochs,
                   "finetune_epochs": cfg.train.finetune_epochs, "train_fraction": cfg.data.train_fraction,
                   "ensemble": cfg.train.ensemble, "estimated_minutes": plan.estimated_minutes,
                   "time_limit_minutes": cfg.train.time_limit_minutes,
                   "backbone": cfg.model.backbone, "profile": profile.to_dict(),
                   "volume": plan.volume, "reasons": plan.reasons},
        "best_epoch": res.metrics.get("best_epoch"),
        # Each member's own val/test AUC (one seed each): the spread the ensemble averages out.
        "members": [{k: m[k] for k in ("seed", "best_epoch", "val_auc", "test_auc")}
                    for m in res.metrics.get("members", [])],
        "val_auc": res.metrics["val"]["auc"],
        # What train.time_limit_minutes cut (epochs or members), if anything.
        "time_limit": res.metrics.get("time_limit"),
        "published": PUBLISHED.get(npz.stem),
        # Where the recipe fitted several candidates: each one's validation AUC and why one was kept.
        "recipe_selection": selection,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="npz file names in the MedMNIST folder (default: all)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="a config override as for 'medtransfer finetune --set' (e.g. model.volume_encoder=slices)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args()
    files = [args.data / f for f in args.files] or sorted(args.data.glob("*.npz"))
    if not files:
        sys.exit(f"no .npz files in {args.data}")
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            r = run_one(f, Path(tmp), args.overrides)
            results[f.stem] = r
            print(f"{f.stem}: test AUC {r['test_auc']:.3f} (95% CI {r['auc_ci'][0]:.3f}-{r['auc_ci'][1]:.3f}), "
                  f"ACC {r['test_acc']:.3f}, {r['minutes']:.1f} min", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
