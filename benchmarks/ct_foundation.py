"""Does medical (CT) pretraining beat ImageNet transfer with few labels? The Merlin I3ResNet-152 CT
encoder against the recipe's ImageNet transfer, the same network from scratch and the same network
with random weights, on AdrenalMNIST3D (28³ and 64³), at 10 %, 25 % and 100 % of the training labels.

Arms (official split; model selection on the official validation split; the test split scored once
per run; 95 % CIs by the patient-level bootstrap of ``medtransfer.metrics`` — MedMNIST has no patient
ids, so every volume is its own patient, as in the recipe):

* ``merlin``: ``i3resnet152.merlin_astra`` frozen (inference-mode BatchNorm); the mean and max of the
  stage map after ``layer2``, ``layer3`` and ``layer4`` (the encoder truncated there) feed a logistic
  regression (standardised features, C chosen on the validation AUC). One feature pass gives all
  three truncations; it streams through ``medtransfer.train.feature_store`` (chunks on disk).
* ``random``: the same encoder, random weights (PyTorch's default initialisation, seed 0), same probe.
* ``scratch``: the same network truncated after ``layer2``, random initialisation, trained end to end
  (AdamW, flips) on the 28³ file only, one seed: what the architecture learns from the labels alone.
* ``recipe``: ``medtransfer finetune --data FILE`` (the default recipe: ImageNet EfficientNet-Lite0,
  slices as channels) with ``data.train_fraction``; 100 % is read from ``results/medmnist.json``
  (the same command, run for RESULTS.md) instead of being trained again.

Intensities: the files hold adrenal shape MASKS scaled to 0..255, not HU. A mask value m is mapped to
the HU of the tissue it stands for, fat around the gland (-100 HU) to adrenal soft tissue (+40 HU):
HU = -100 + 140 * m / 255, then the encoder's own CT window (-1000..200 HU -> [0, 1]). The
contrast is the one the encoder saw between adrenal and fat in abdominal CT. Volumes are resized
trilinearly to ``--size28`` (28³ file) or kept at 64³; the stored axis order is used as (X, Y, Z).

Writes ``benchmarks/results/ct_foundation.json`` and ``ct_foundation.png``.

Usage: ``python benchmarks/ct_foundation.py`` (the full run, planned for 45-60 minutes on an idle
2-core CPU) or ``--quick`` (a few volumes per split, every arm once; it measures the seconds per
volume of each truncation and prints the full run's extrapolated minutes; under 2 minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medtransfer.backbones import check_input_contract, get_weight_spec, load_backbone
from medtransfer.backbones.i3resnet import mean_max_pool
from medtransfer.metrics import binary_auc, bootstrap_ci
from medtransfer.train.feature_store import extract_features

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "medmnist"
RESULTS = ROOT / "benchmarks" / "results"
ENCODER = "i3resnet152.merlin_astra"
FAT_HU, ADRENAL_HU = -100.0, 40.0
STAGES = (2, 3, 4)
C_GRID = (1e-3, 1e-2, 1e-1, 1.0)


# --------------------------------------------------------------------------------------------- data
def to_encoder_units(masks: np.ndarray) -> np.ndarray:
    """0..255 shape masks → HU of fat (0) to adrenal tissue (255) → the encoder's HU window, [0, 1]."""
    hu = FAT_HU + (ADRENAL_HU - FAT_HU) * masks.astype(np.float32) / 255.0
    return get_weight_spec(ENCODER).ct.window(hu)


def load_splits(npz: Path, size: int, limit: dict[str, int] | None = None) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """``{split: (x [N, 1, S, S, S] in encoder units, y [N])}``; ``limit`` keeps the first n per split."""
    out = {}
    with np.load(npz) as f:
        for split in ("train", "val", "test"):
            a, y = f[f"{split}_images"], f[f"{split}_labels"].reshape(-1).astype(np.int64)
            if limit:
                a, y = a[: limit[split]], y[: limit[split]]
            x = torch.from_numpy(to_encoder_units(a))[:, None]
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
            out[split] = (x.contiguous(), y)
    return out


def subsample(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified ``fraction`` of ``y`` (all of it at 1.0)."""
    if fraction >= 1.0:
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(y == c), max(2, round(fraction * (y == c).sum())), replace=False)
            for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


# --------------------------------------------------------------------------------------------- encoder
def build_encoder(weights: str) -> torch.nn.Module:
    """The full encoder in inference mode; ``weights``: ``pretrained`` or ``none`` (seed 0)."""
    torch.manual_seed(0)
    model, report = load_backbone(get_weight_spec(ENCODER), 1, weights)
    print(report.summary().splitlines()[0] + "; " + "; ".join(report.summary().splitlines()[1:3]), flush=True)
    return model.eval()


def stage_features(model: torch.nn.Module, stages=STAGES):
    """``x → [mean ‖ max of layer2 ‖ … ‖ layer4]``: every truncation from one pass, and the columns of each."""
    names = [f"layer{s}" for s in stages]
    cols, start = {}, 0
    for s, c in zip(stages, (512, 1024, 2048)):
        cols[s] = (start, start + 2 * c)
        start += 2 * c

    def encode(x: torch.Tensor) -> torch.Tensor:
        feats = dict(zip(model.stage_names, model.forward_stages(x)))
        return torch.cat([mean_max_pool(feats[n]) for n in names], dim=1)

    return encode, cols


def feature_pass(model, splits, root: Path, batch: int, tag: str) -> tuple[dict[str, np.ndarray], dict[int, tuple], float]:
    """Features of every split through the feature store; returns them, the columns per stage and the seconds."""
    encode, cols = stage_features(model)
    check_input_contract(splits["train"][0][:batch], ENCODER)  # the mapped masks are in the encoder's range
    feats, seconds = {}, 0.0
    for split, (x, y) in splits.items():
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.from_numpy(y)), batch_size=batch)
        store = extract_features(encode, loader, root / f"{tag}-{split}", chunk_rows=256,
                                 description=f"{tag} {split}", progress=sys.stderr.isatty())
        feats[split] = store.features()
        seconds += store.seconds
    return feats, cols, seconds


def seconds_per_volume(model, x: torch.Tensor, stages: int, batch: int, reps: int = 2) -> float:
    """Feature-pass cost of the encoder truncated after ``layer<stages>`` (median of ``reps`` timed passes)."""
    import copy

    m = copy.deepcopy(model)
    if stages < 4:
        m.truncate(stages)
    times = []
    with torch.inference_mode():
        m(x[:1])
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(0, len(x), batch):
                m(x[i:i + batch])
            times.append((time.perf_counter() - t0) / len(x))
    return float(np.median(times))


# --------------------------------------------------------------------------------------------- heads
def auc_with_ci(y: np.ndarray, p: np.ndarray) -> dict:
    ci = bootstrap_ci(binary_auc, y, p, groups=[f"v{i}" for i in range(len(y))], n_boot=1000, seed=0)
    return {"test_auc": round(ci.point, 4), "auc_ci": [round(ci.low, 4), round(ci.high, 4)]}


def probe(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray], cols: tuple[int, int], idx: np.ndarray) -> dict:
    """Logistic regression on standardised features (train subset ``idx``), C chosen on the validation AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    a, b = cols
    scaler = StandardScaler().fit(feats["train"][idx, a:b])
    z = {s: scaler.transform(f[:, a:b]) for s, f in feats.items()}
    best = None
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=3000).fit(z["train"][idx], labels["train"][idx])
        val = binary_auc(labels["val"], clf.predict_proba(z["val"])[:, 1])
        if best is None or val > best[0]:
            best = (val, c, clf)
    val_auc, c, clf = best
    return {"val_auc": round(float(val_auc), 4), "C": c, **auc_with_ci(labels["test"], clf.predict_proba(z["test"])[:, 1])}


def train_scratch(splits, idx: np.ndarray, epochs: int, seed: int, batch: int = 16) -> dict:
    """The encoder truncated after layer2, random initialisation, trained end to end with flips; best
    validation epoch scored on test. BatchNorm trains (no pretrained statistics to keep)."""
    from medtransfer.backbones.i3resnet import I3ResNet

    torch.manual_seed(seed)
    net = I3ResNet(1)
    net.truncate(2)
    model = torch.nn.Sequential(net, torch.nn.Linear(net.num_features, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x, y = splits["train"][0][idx], torch.from_numpy(splits["train"][1][idx]).float()
    g = torch.Generator().manual_seed(seed)
    best, t0 = (-1.0, None, 0), time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        for i in torch.randperm(len(x), generator=g).split(batch):
            xb = x[i]
            for d in (2, 3, 4):
                if torch.rand(1, generator=g) < 0.5:
                    xb = xb.flip(d)
            loss = F.binary_cross_entropy_with_logits(model(xb)[:, 0], y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = binary_auc(splits["val"][1], _predict(model, splits["val"][0]))
        if val > best[0]:
            best = (val, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
    model.load_state_dict(best[1])
    test = auc_with_ci(splits["test"][1], _predict(model, splits["test"][0]))
    return {"val_auc": round(float(best[0]), 4), "best_epoch": best[2], "epochs": epochs, **test,
            "seconds": round(time.perf_counter() - t0, 1), "seconds_per_epoch": round((time.perf_counter() - t0) / epochs, 2)}


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch: int = 32) -> np.ndarray:
    model.eval()
    return torch.cat([torch.sigmoid(model(x[i:i + batch])[:, 0]) for i in range(0, len(x), batch)]).numpy()


def scratch_epochs(fraction: float, epochs_at_100: int) -> int:
    """Fewer labels get more epochs: x2 at 25 %, x4 at 10 % (fewer steps than at 100 %, as many as CPU allows)."""
    return int(epochs_at_100 * min(4, max(1, round(0.5 / fraction))))


# --------------------------------------------------------------------------------------------- recipe
def recipe_run(npz: Path, fraction: float, seed: int, out: Path) -> dict:
    """``medtransfer finetune --data FILE`` (default recipe) on ``fraction`` of the training labels."""
    cmd = [sys.executable, "-m", "medtransfer", "finetune", "--data", str(npz), "--out", str(out), "--quiet",
           "--set", f"data.train_fraction={fraction}", "--set", f"train.seed={seed}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:], "command": " ".join(cmd[2:])}
    m = json.loads((out / "metrics.json").read_text())
    return {"test_auc": round(m["test"]["auc"], 4), "auc_ci": [round(v, 4) for v in m["test"]["auc_ci"]],
            "val_auc": round((m.get("val") or {}).get("auc") or float("nan"), 4),
            "seconds": round(time.perf_counter() - t0, 1), "command": "medtransfer " + " ".join(cmd[3:])}


def recipe_at_100(stem: str) -> dict | None:
    path = RESULTS / "medmnist.json"
    if not path.is_file() or stem not in json.loads(path.read_text()):
        return None
    r = json.loads(path.read_text())[stem]
    return {"test_auc": round(r["test_auc"], 4), "auc_ci": [round(v, 4) for v in r["auc_ci"]],
            "val_auc": round(r["val_auc"], 4), "seconds": round(60 * r["minutes"], 1),
            "source": "benchmarks/results/medmnist.json (medtransfer finetune --data FILE, default recipe)"}


# --------------------------------------------------------------------------------------------- run
def cost_table(model, x: torch.Tensor, batch: int, reps: int) -> dict[str, float]:
    return {f"layer{s}": round(seconds_per_volume(model, x, s, batch, reps), 4) for s in STAGES}


def probe_rows(file: str, arm: str, feats, cols, labels, fractions, seeds) -> list[dict]:
    rows = []
    for fraction in fractions:
        for seed in (seeds if fraction < 1 else seeds[:1]):  # 100 %: the probe is deterministic
            idx = subsample(labels["train"], fraction, seed)
            for s in STAGES:
                t0 = time.perf_counter()
                r = probe(feats, labels, cols[s], idx)
                rows.append({"file": file, "arm": arm, "stage": f"layer{s}", "fraction": fraction, "seed": seed,
                             "n_train": int(len(idx)), **r, "seconds": round(time.perf_counter() - t0, 2)})
                print(f"{file} {arm:7s} layer{s} {100 * fraction:4.0f}% seed {seed}: val {r['val_auc']:.3f} "
                      f"test {r['test_auc']:.3f} {r['auc_ci']}", flush=True)
    return rows


def run_file(npz: Path, args, encoders, tmp: Path) -> tuple[list[dict], dict]:
    size = args.size28 if "64" not in npz.stem else 64
    limit = ({"train": 24, "val": 12, "test": 24} if size != 64 else {"train": 12, "val": 8, "test": 12}) if args.quick else None
    splits = load_splits(npz, size, limit)
    labels = {s: y for s, (_, y) in splits.items()}
    n_total = sum(len(y) for y in labels.values())
    info = {"input_size": size, "n": {s: int(len(y)) for s, y in labels.items()},
            "seconds_per_volume": cost_table(encoders["merlin"], splits["val"][0][: 4 if args.quick else 16], args.batch,
                                             1 if args.quick else 2)}
    rows = []
    for arm, model in encoders.items():
        feats, cols, seconds = feature_pass(model, splits, tmp, args.batch, f"{npz.stem}-{arm}")
        info[f"feature_pass_seconds_{arm}"] = round(seconds, 1)
        info["feature_pass_seconds_per_volume"] = round(seconds / n_total, 4)
        rows += probe_rows(npz.stem, arm, feats, cols, labels, args.fractions, args.seeds)
    if args.scratch and (size != 64 or args.scratch_64):
        small = load_splits(npz, args.scratch_size, limit)
        for fraction in args.fractions:
            idx = subsample(labels["train"], fraction, 0)
            r = train_scratch(small, idx, 1 if args.quick else scratch_epochs(fraction, args.scratch_epochs), seed=0)
            rows.append({"file": npz.stem, "arm": "scratch", "stage": "layer2", "fraction": fraction, "seed": 0,
                         "n_train": int(len(idx)), "input_size": args.scratch_size, **r})
            print(f"{npz.stem} scratch layer2 {100 * fraction:4.0f}%: val {r['val_auc']:.3f} test {r['test_auc']:.3f} "
                  f"({r['seconds_per_epoch']} s/epoch)", flush=True)
    rows += recipe_rows(npz, args, tmp)
    return rows, info


def recipe_rows(npz: Path, args, tmp: Path) -> list[dict]:
    rows = []
    for fraction in args.fractions:
        if fraction >= 1.0:
            r = recipe_at_100(npz.stem)
        elif args.recipe and not args.quick:
            r = recipe_run(npz, fraction, 0, tmp / f"recipe-{npz.stem}-{fraction}")
        else:
            continue
        if r is not None:
            rows.append({"file": npz.stem, "arm": "recipe", "stage": "efficientnet_lite0 (slices as channels)",
                         "fraction": fraction, "seed": 0, **r})
    return rows


def plan_minutes(info: dict, args, rows: list[dict]) -> dict:
    """The full run's minutes on this machine, extrapolated from the measured seconds per volume."""
    n_full = 1188 + 98 + 298
    features = sum(2 * n_full * i["seconds_per_volume"]["layer4"] for i in info.values()) / 60
    per_probe = np.median([r["seconds"] for r in rows if r["arm"] in ("merlin", "random")] or [1.0])
    n_probes = len(info) * 2 * len(STAGES) * (2 * 3 + 1)
    scratch = [r for r in rows if r["arm"] == "scratch"]
    scratch_min = 0.0
    if scratch:
        per_volume_epoch = scratch[-1]["seconds_per_epoch"] / max(scratch[-1]["n_train"], 1)
        scratch_min = sum(round(f * 1188) * scratch_epochs(f, args.scratch_epochs) for f in (0.1, 0.25, 1.0)) \
            * per_volume_epoch * 1.15 / 60  # + validation passes
    recipe = sum(r["seconds"] / 60 * max(0.2, f + 0.1) for r in rows if r["arm"] == "recipe" and r["fraction"] >= 1
                 for f in (0.1, 0.25))
    total = features + per_probe * n_probes / 60 + scratch_min + recipe
    return {"feature_passes": round(features, 1), "probes": round(per_probe * n_probes / 60, 1),
            "scratch": round(scratch_min, 1), "recipe_10_25_estimate": round(recipe, 1), "total": round(total, 1),
            "threads": torch.get_num_threads()}


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        key = f"{r['file']}|{r['arm']}|{r['stage']}|{r['fraction']:g}"
        out.setdefault(key, []).append(r["test_auc"])
    return {k: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4),
                "n": len(v)} for k, v in out.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted({r["file"] for r in rows})
    fig, axes = plt.subplots(1, len(files), figsize=(6 * len(files), 4.5), squeeze=False)
    styles = {"merlin": "-", "random": "--", "scratch": ":", "recipe": "-."}
    for ax, file in zip(axes[0], files):
        groups = sorted({(r["arm"], r["stage"]) for r in rows if r["file"] == file})
        for arm, stage in groups:
            sel = [r for r in rows if r["file"] == file and r["arm"] == arm and r["stage"] == stage]
            fr = sorted({r["fraction"] for r in sel})
            mean = [np.mean([r["test_auc"] for r in sel if r["fraction"] == f]) for f in fr]
            label = f"{arm} {stage}" if arm in ("merlin", "random", "scratch") else "recipe (ImageNet)"
            ax.plot([100 * f for f in fr], mean, styles.get(arm, "-"), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xticks([10, 25, 100], ["10%", "25%", "100%"])
        ax.set_xlabel("fraction of training labels")
        ax.set_ylabel("test AUC (mean over seeds)")
        ax.set_title(file)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few volumes per split, every arm once (< 2 min)")
    ap.add_argument("--files", nargs="+", default=["adrenalmnist3d.npz", "adrenalmnist3d_64.npz"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="label subsamples per fraction")
    ap.add_argument("--size28", type=int, default=48, help="input side for the 28³ file (trilinear)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--scratch-size", type=int, default=28, help="input side of the from-scratch arm (28: native)")
    ap.add_argument("--scratch-epochs", type=int, default=6, help="from-scratch epochs at 100%% (x2 at 25%%, x4 at 10%%)")
    ap.add_argument("--no-scratch", dest="scratch", action="store_false")
    ap.add_argument("--scratch-64", action="store_true", help="also train from scratch on the 64³ file")
    ap.add_argument("--no-recipe", dest="recipe", action="store_false", help="do not run the recipe at 10/25%%")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/ct_foundation.json)")
    args = ap.parse_args()
    if args.quick:
        args.fractions, args.seeds = [0.25, 1.0], [0]
    files = [DATA / f for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"data not found: {missing}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    encoders = {"merlin": build_encoder("pretrained"), "random": build_encoder("none")}
    rows, info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for npz in files:
            r, info[npz.stem] = run_file(npz, args, encoders, Path(tmp))
            rows += r
            print(json.dumps({npz.stem: info[npz.stem]}), flush=True)
    plan = plan_minutes(info, args, rows)
    print("full-run estimate (minutes on this machine):", json.dumps(plan), flush=True)
    result = {
        "question": "medical (CT) pretraining vs ImageNet transfer vs the same network random / from scratch",
        "encoder": ENCODER, "hu_window": list(get_weight_spec(ENCODER).ct.hu_window),
        "mask_mapping": f"HU = {FAT_HU:g} + {ADRENAL_HU - FAT_HU:g} * m / 255 (fat to adrenal tissue), then the HU window",
        "probe": f"mean+max pooled stage map, StandardScaler, LogisticRegression, C in {list(C_GRID)} chosen on val AUC",
        "quick": args.quick, "fractions": args.fractions, "seeds": args.seeds, "files": info, "plan_full_run": plan,
        "summary": summarise(rows), "rows": rows, "minutes": round((time.perf_counter() - t0) / 60, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "reproduce": "python benchmarks/ct_foundation.py" + (" --quick" if args.quick else ""),
    }
    out = args.out or RESULTS / ("ct_foundation_quick.json" if args.quick else "ct_foundation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} ({result['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
