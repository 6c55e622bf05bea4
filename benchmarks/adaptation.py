"""Adaptation modes on real data: full fine-tuning, linear probe, LoRA and BitFit, and what ``auto`` picks.

Data: the shared BreastMNIST and PneumoniaMNIST ``.npz`` files (official splits; the test split scored
once per run). Backbone: EfficientNet-Lite0 with its real ImageNet weights (the pip package, offline).
For every dataset, every fraction of the training labels (10% and 100%, a stratified subset drawn with
the run's seed) and every seed (0, 1, 2), the four modes are trained with the same recipe: 4 x 2 x 3 x 2
= 48 runs. Reported per (dataset, fraction, mode): the test AUC of each seed with its patient-level
bootstrap CI, mean ± sd over seeds with a 95% t-interval, trainable / total parameters, seconds per
fine-tuning epoch (for the probe: per epoch on cached features, plus the one pass that computes them).

``auto``: (1) the *validation* protocol's choice for every (dataset, fraction, seed) is read off the four
runs themselves (highest validation AUC, ties to fewer trainable parameters: the same fits auto's
validation protocol trains, same seed and data), with the chosen mode's test AUC; (2) the *cv* protocol
runs for real (``train.adaptation=auto``, ``train.auto_protocol=cv``: 3 patient-grouped folds of
train + val per candidate, then the chosen mode on train + val) for ``--auto-seeds`` on the settings in
``--auto-cv`` (default: every setting but PneumoniaMNIST at 100%, whose 13 fits on 5,232 images would
alone take most of the budget; its validation split, 135 images in the smaller class, is large enough
for auto's default rule to use the validation protocol anyway).

The recipe is shortened so the whole benchmark fits about 45 minutes on an idle 2-core CPU: 32 px
inputs (the files are 28 px), batch 32, one head-only epoch on cached features, then ``--epochs``
fine-tuning epochs at 100% and ``epochs / fraction`` capped at ``--max-epochs`` at 10% (so small
fractions get comparable optimisation steps); the linear probe gets the same number of epochs, all on
the head. LoRA (rank 8, alpha 16, on EfficientNet-Lite0's 32 pointwise convolutions) and BitFit train
at ``train.lr`` (``adapter_lr_mult=1``); full fine-tuning at ``lr × backbone_lr_mult = 1e-4``. These are
short schedules: they rank the modes under a CPU budget, not at convergence.

Usage: ``python benchmarks/adaptation.py`` (full, ~45 min idle) or ``--quick`` (BreastMNIST, seed 0,
1 epoch: ~1-2 min; prints the per-run cost and the estimated full runtime). Writes
``benchmarks/results/adaptation.json`` (with ``--quick``: ``adaptation_quick.json`` in the temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "medmnist"
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("linear_probe", "bitfit", "lora", "full")
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def recipe(fraction: float, seed: int, epochs: int, max_epochs: int, size: int) -> list[str]:
    """Overrides shared by every mode of one (fraction, seed)."""
    finetune = int(min(max_epochs, max(epochs, round(epochs / fraction))))
    return [f"data.size={size}", f"data.train_fraction={fraction}", f"train.seed={seed}", "train.batch_size=32",
            "train.head_epochs=1", "train.head_augment=false", f"train.finetune_epochs={finetune}",
            "model.backbone=efficientnet_lite0.in1k", "model.weights=pretrained", "train.time_limit_minutes=0",
            "data.val_max=0", "train.ensemble=1"]


def one_run(npz: Path, overrides: list[str], out: Path) -> dict:
    from medtransfer.data.profile import config_for_data
    from medtransfer.train.finetune import finetune

    cfg, _ = config_for_data(npz, overrides=overrides)
    t0 = time.perf_counter()
    res = finetune(cfg, data=npz, out_dir=out, progress=False)
    m = res.metrics
    a = m["adaptation"]
    return {"mode": a["mode"], "n_train": res.split_report["train"]["images"], "val_auc": m["val"]["auc"],
            "val_auc_ci": m["val"].get("auc_ci"), "test_auc": m["test"]["auc"], "test_auc_ci": m["test"].get("auc_ci"),
            "trainable": a["parameters"]["trainable"], "total": a["parameters"]["total"],
            "seconds_per_epoch": a["seconds_per_epoch"], "feature_cache_seconds": m.get("feature_cache_seconds"),
            "best_epoch": m.get("best_epoch"), "selection": a.get("selection"),
            "epochs_planned": m.get("time_limit", {}).get("epochs_planned", cfg.train.head_epochs + cfg.train.finetune_epochs),
            "n_images": sum(v["images"] for v in res.split_report.values()),
            "seconds": round(time.perf_counter() - t0, 1)}


def _mean_sd_ci(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    half = _T95.get(len(values) - 1, 1.96) * sd / len(values) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "sd": round(sd, 4), "ci95_of_mean": [round(mean - half, 4), round(mean + half, 4)]}


def summarise(runs: list[dict]) -> dict:
    """Per (dataset, fraction, mode): test AUC over seeds, parameters, seconds per epoch."""
    out: dict = {}
    for r in runs:
        out.setdefault(r["dataset"], {}).setdefault(f"{r['fraction']:g}", {}).setdefault(r["mode"], []).append(r)
    table = {}
    for ds, by_fraction in out.items():
        for fr, by_mode in by_fraction.items():
            for mode, rs in by_mode.items():
                phase = "head" if mode == "linear_probe" else "finetune"
                table[f"{ds} {fr} {mode}"] = {
                    "test_auc": _mean_sd_ci([x["test_auc"] for x in rs]),
                    "per_seed": [{"seed": x["seed"], "test_auc": round(x["test_auc"], 4),
                                  "ci": [round(c, 4) if c is not None else None for c in x["test_auc_ci"] or []]}
                                 for x in rs],
                    "trainable": rs[0]["trainable"], "total": rs[0]["total"],
                    "seconds_per_epoch": round(statistics.fmean(x["seconds_per_epoch"].get(phase, 0.0) for x in rs), 2),
                    "n_train": rs[0]["n_train"]}
    return table


def validation_choices(runs: list[dict]) -> list[dict]:
    """auto's validation protocol, read off the four runs of every (dataset, fraction, seed)."""
    groups: dict = {}
    for r in runs:
        if r["mode"] in MODES:
            groups.setdefault((r["dataset"], r["fraction"], r["seed"]), []).append(r)
    out = []
    for (ds, fr, seed), rs in sorted(groups.items()):
        best = sorted(rs, key=lambda x: (-x["val_auc"], x["trainable"]))[0]
        oracle = max(rs, key=lambda x: x["test_auc"])
        out.append({"dataset": ds, "fraction": fr, "seed": seed, "chosen": best["mode"],
                    "chosen_test_auc": round(best["test_auc"], 4), "best_test_mode": oracle["mode"],
                    "best_test_auc": round(oracle["test_auc"], 4)})
    return out


def _costs(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """Per mode, from the quick 100% runs: (seconds per training image and fine-tuning epoch, seconds per
    evaluated image for everything else: loading, the feature pass, validation and the final report)."""
    out = {}
    for r in runs:
        if r["fraction"] == 1.0:
            epoch = r["seconds_per_epoch"].get("finetune", r["seconds_per_epoch"]["head"])
            epochs = r["epochs_planned"] - (0 if r["mode"] == "linear_probe" else 1)
            out[r["mode"]] = (epoch / r["n_train"], (r["seconds"] - epochs * epoch) / r["n_images"])
    return out


def estimate_minutes(quick: list[dict], auto_cv: list[str]) -> float:
    """The full benchmark's runtime from the quick runs' costs (linear in images and epochs): 3 seeds x 4 modes
    per setting, and for ``auto_cv`` settings 4 modes x 3 folds of train + val plus the refit (costed as full)."""
    from medtransfer.data.profile import profile_npz

    costs = _costs(quick)

    def fit(mode: str, epochs: int, n_train: float, n_eval: float) -> float:
        per_image_epoch, per_image = costs[mode]
        return epochs * n_train * per_image_epoch + (n_train + n_eval) * per_image

    total = 0.0
    for ds in ("breastmnist", "pneumoniamnist"):
        p = profile_npz(DATA / f"{ds}.npz")
        for fr in (0.1, 1.0):
            e, n = int(min(12, max(3, round(3 / fr)))), p.n_train * fr
            total += 3 * sum(fit(m, e, n, p.n_val + p.n_test) for m in MODES)
            if f"{ds}:{fr:g}" in auto_cv:
                pool = n + p.n_val
                total += 3 * sum(fit(m, e, pool * 2 / 3, pool / 3) for m in MODES) + fit("full", e, pool, p.n_test)
    return round(total / 60, 1)


def settings(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    return [(ds, fr, seed) for ds in args.data for fr in args.fractions for seed in args.seeds]


def run_all(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], list[dict]]:
    runs, autos = [], []
    for ds, fr, seed in settings(args):
        npz = DATA / f"{ds}.npz"
        base = recipe(fr, seed, args.epochs, args.max_epochs, args.size)
        for mode in MODES:
            r = one_run(npz, [*base, f"train.adaptation={mode}"], tmp / f"{ds}_{fr}_{seed}_{mode}")
            runs.append({"dataset": ds, "fraction": fr, "seed": seed, **r})
            print(f"{ds:15s} {100 * fr:4.0f}% seed {seed} {mode:12s} test AUC {r['test_auc']:.3f} "
                  f"val {r['val_auc']:.3f}  trainable {r['trainable']:>9,}  {r['seconds']:6.1f} s", flush=True)
        if seed in args.auto_seeds and f"{ds}:{fr:g}" in args.auto_cv:
            r = one_run(npz, [*base, "train.adaptation=auto", "train.auto_protocol=cv"], tmp / f"{ds}_{fr}_{seed}_auto")
            sel = r["selection"]
            autos.append({"dataset": ds, "fraction": fr, "seed": seed, "protocol": sel["protocol"],
                          "chosen": sel["chosen"], "test_auc": round(r["test_auc"], 4), "reason": sel["reason"],
                          "candidates": [{k: c[k] for k in ("mode", "auc", "auc_ci", "best_epochs")}
                                         for c in sel["candidates"]], "seconds": r["seconds"]})
            print(f"{ds:15s} {100 * fr:4.0f}% seed {seed} auto (cv) chose {sel['chosen']}: test AUC "
                  f"{r['test_auc']:.3f}  {r['seconds']:6.1f} s", flush=True)
    return runs, autos


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["breastmnist", "pneumoniamnist"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs at 100%% (after 1 head-only epoch)")
    ap.add_argument("--max-epochs", type=int, default=12, help="cap on epochs / fraction at small fractions")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--auto-seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--auto-cv", nargs="*", default=["breastmnist:0.1", "breastmnist:1", "pneumoniamnist:0.1"],
                    help="dataset:fraction settings where auto's cv protocol runs for real")
    ap.add_argument("--quick", action="store_true", help="BreastMNIST, seed 0, 1 epoch, auto cv at 10%% only")
    args = ap.parse_args()
    if args.quick:
        args.data, args.seeds, args.epochs, args.max_epochs = ["breastmnist"], [0], 1, 1
        args.auto_cv = ["breastmnist:0.1"]
    missing = [ds for ds in args.data if not (DATA / f"{ds}.npz").is_file()]
    if missing:
        print(f"data not found in {DATA}: {missing}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runs, autos = run_all(args, Path(tmp))
    result = {
        "backbone": "efficientnet_lite0.in1k (pip ImageNet weights)", "modes": list(MODES),
        "recipe": recipe(1.0, 0, args.epochs, args.max_epochs, args.size)[:7],
        "epochs": {f"{fr:g}": int(min(args.max_epochs, max(args.epochs, round(args.epochs / fr))))
                   for fr in args.fractions},
        "summary": summarise(runs), "auto_validation_protocol": validation_choices(runs), "auto_cv_protocol": autos,
        "runs": runs, "minutes": round((time.perf_counter() - t0) / 60, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "reproduce": "python benchmarks/adaptation.py" + (" --quick" if args.quick else ""),
    }
    out = Path(tempfile.gettempdir()) / "adaptation_quick.json" if args.quick else RESULTS / "adaptation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print(json.dumps({k: result[k] for k in ("summary", "auto_validation_protocol", "minutes")}, indent=1))
    if args.quick:
        print(f"per-image costs (s per training image and epoch, s per image otherwise): {_costs(runs)}")
        defaults = ["breastmnist:0.1", "breastmnist:1", "pneumoniamnist:0.1"]
        print(f"estimated full benchmark (48 runs + 3 auto cv runs) on this machine now: "
              f"{estimate_minutes(runs, defaults)} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
