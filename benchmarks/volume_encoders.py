"""Volume encoders for a 2D backbone side by side → benchmarks/results/volume_encoders.json.

Each variant is one run (seed 0, one member) of the recipe that ``medtransfer finetune --data FILE.npz
--set model.volume_encoder=...`` plans for a volume file: the encoder (``slices`` / ``views``: frozen
backbone without its last stage, pooling and head trained on cached slice features), the pooling
(``attention`` / ``mean``), the backbone depth (``model.stages=0``: all stages), or the default
``channels`` recipe (fine-tuned). The recipes with their ensembles are ``benchmarks/medmnist.py``. Model selection on the official validation split; the test AUC is
reported for every variant, but only the validation AUC may choose between them.

Run alone (2 cores): ``python benchmarks/volume_encoders.py adrenalmnist3d.npz`` (about 25 min at 28³).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "medmnist"
RESULTS = ROOT / "benchmarks" / "results" / "volume_encoders.json"

VARIANTS = {
    "slices + attention (1 member)": ["model.volume_encoder=slices"],
    "slices + mean": ["model.volume_encoder=slices", "model.slice_pooling=mean"],
    "slices + attention, all stages": ["model.volume_encoder=slices", "model.stages=0"],
    "views + attention": ["model.volume_encoder=views"],
    "channels (the default recipe, 1 member)": [],
}


def run_variant(npz: Path, overrides: list[str], out: Path) -> dict:
    from medtransfer.data.profile import config_for_data
    from medtransfer.train.finetune import finetune

    cfg, _ = config_for_data(npz, overrides=["train.ensemble=1", *overrides])
    t0 = time.perf_counter()
    res = finetune(cfg, data=npz, out_dir=out, progress=False)
    m = res.metrics
    return {"val_auc": m["val"]["auc"], "test_auc": m["test"]["auc"], "test_auc_ci": m["test"].get("auc_ci"),
            "best_epoch": m.get("best_epoch"), "minutes": (time.perf_counter() - t0) / 60,
            "feature_cache_seconds": m.get("feature_cache_seconds"), "overrides": overrides,
            "encoder": res.load_report.volume_encoder}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="volume .npz file names in the MedMNIST folder")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.files:
            npz = DATA / name
            if not npz.is_file():
                sys.exit(f"{npz} not found (set MEDTRANSFER_SHARED_DATA)")
            for i, variant in enumerate(args.variants):
                r = run_variant(npz, VARIANTS[variant], Path(tmp) / f"{npz.stem}_{i}")
                results.setdefault(npz.stem, {})[variant] = r
                print(f"{npz.stem} | {variant}: val AUC {r['val_auc']:.3f}, test AUC {r['test_auc']:.3f}, "
                      f"{r['minutes']:.1f} min", flush=True)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
