"""Sample efficiency: test AUC against the fraction of labelled training data, ImageNet-pretrained
versus random initialisation, several seeds.

Data: a MedMNIST ``.npz`` (default BreastMNIST from ``../shared/data/medmnist``). For every fraction
(5, 10, 25, 50, 100 % of the official training split, stratified subsample drawn with the run's seed)
and every seed, the same recipe is trained twice, once from the pip ImageNet EfficientNet-Lite0
weights and once from random weights (``model.weights=none``; its BatchNorm then trains). The recipe
is medtransfer's automatic one for this file (``config_for_data``) with a shorter schedule so the 30
runs fit on a 2-core CPU: 2 head-only epochs, then ``--epochs`` fine-tuning epochs at 100 % and
``epochs / fraction`` (at most ``--max-epochs``) below, so that small fractions get a comparable number
of optimisation steps instead of a handful; model selection (best epoch) on the full official
validation split, the official test split scored once per run.

Reported per (init, fraction): mean and sd of the test AUC over seeds, a 95% t-interval of that
mean, and each run's own patient-level bootstrap CI. Writes
``benchmarks/results/sample_efficiency.json`` and ``sample_efficiency.png``.

Usage: ``python benchmarks/sample_efficiency.py [--data FILE.npz] [--seeds 0 1 2] [--epochs 6]``
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
FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.0)
# two-sided 95% Student t quantiles for n - 1 degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def epochs_for(fraction: float, epochs: int, max_epochs: int) -> int:
    """Fine-tuning epochs at ``fraction``: ``epochs`` at 100 %, scaled by 1 / fraction, capped."""
    return int(min(max_epochs, max(epochs, round(epochs / fraction))))


def one_run(npz: Path, init: str, fraction: float, seed: int, epochs: int, out: Path) -> dict:
    from medtransfer.data.profile import config_for_data
    from medtransfer.train.finetune import finetune

    overrides = [f"data.train_fraction={fraction}", f"train.seed={seed}", "train.head_epochs=2",
                 f"train.finetune_epochs={epochs}", "model.weights=" + ("pretrained" if init == "pretrained" else "none")]
    cfg, _ = config_for_data(npz, overrides=overrides)
    t0 = time.perf_counter()
    res = finetune(cfg, data=npz, out_dir=out, progress=False)
    test = res.metrics["test"]
    return {"init": init, "fraction": fraction, "seed": seed, "finetune_epochs": epochs, "n_train": res.split_report["train"]["images"],
            "test_auc": test["auc"], "auc_ci": test.get("auc_ci"), "best_epoch": res.metrics.get("best_epoch"),
            "seconds": round(time.perf_counter() - t0, 1)}


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for init in ("pretrained", "scratch"):
        out[init] = {}
        for f in FRACTIONS:
            aucs = [r["test_auc"] for r in runs if r["init"] == init and r["fraction"] == f]
            if not aucs:
                continue
            mean = statistics.fmean(aucs)
            sd = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
            half = _T95.get(len(aucs) - 1, 1.96) * sd / len(aucs) ** 0.5 if len(aucs) > 1 else 0.0
            out[init][f"{f:g}"] = {"mean_auc": round(mean, 4), "sd": round(sd, 4),
                                   "ci95_of_mean": [round(mean - half, 4), round(mean + half, 4)],
                                   "aucs": [round(a, 4) for a in aucs]}
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for init, colour in (("pretrained", "tab:blue"), ("scratch", "tab:orange")):
        fr = sorted(summary[init], key=float)
        x = [100 * float(f) for f in fr]
        m = [summary[init][f]["mean_auc"] for f in fr]
        lo = [m_ - summary[init][f]["ci95_of_mean"][0] for m_, f in zip(m, fr)]
        hi = [summary[init][f]["ci95_of_mean"][1] - m_ for m_, f in zip(m, fr)]
        ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=4, color=colour,
                    label="ImageNet-pretrained" if init == "pretrained" else "random init")
        for f, xx in zip(fr, x):
            ax.scatter([xx] * len(summary[init][f]["aucs"]), summary[init][f]["aucs"], s=8, color=colour, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 25, 50, 100], ["5%", "10%", "25%", "50%", "100%"])
    ax.set_xlabel("fraction of labelled training data")
    ax.set_ylabel("test AUC (mean over seeds, 95% CI)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA / "breastmnist.npz")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs at 100%% (after 2 head-only epochs)")
    ap.add_argument("--max-epochs", type=int, default=40, help="cap on the scaled epochs of small fractions")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for f in FRACTIONS:
                for init in ("pretrained", "scratch"):
                    r = one_run(args.data, init, f, seed, epochs_for(f, args.epochs, args.max_epochs),
                                Path(tmp) / f"{init}_{f}_{seed}")
                    runs.append(r)
                    print(f"seed {seed} {init:10s} {100 * f:5.0f}%  n_train {r['n_train']}  "
                          f"test AUC {r['test_auc']:.3f}  ({r['seconds']:.0f} s)", flush=True)
    summary = summarise(runs)
    lead = {f"{f:g}": round(summary["pretrained"][f"{f:g}"]["mean_auc"] - summary["scratch"][f"{f:g}"]["mean_auc"], 4)
            for f in FRACTIONS}
    result = {
        "dataset": args.data.stem, "fractions": list(FRACTIONS), "seeds": args.seeds,
        "recipe": f"config_for_data(file) + train.head_epochs=2, train.finetune_epochs={args.epochs} at 100%, "
                  f"epochs/fraction (at most {args.max_epochs}) below; "
                  "pretrained: efficientnet_lite0.in1k pip weights; scratch: model.weights=none",
        "summary": summary, "pretrained_minus_scratch_mean_auc": lead, "runs": runs,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "reproduce": "python benchmarks/sample_efficiency.py",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sample_efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, RESULTS / "sample_efficiency.png", f"{args.data.stem}: pretrained vs random init")
    print(json.dumps({"summary": summary, "lead": lead, "minutes": result["minutes"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
