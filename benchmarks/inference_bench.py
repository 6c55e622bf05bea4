"""Batch inference speed and memory, measured side by side in one run.

On one folder of synthetic chest-radiograph DICOM files (the demo generator's images, copied to
reach the sizes below) with EfficientNet-Lite0 at the xray preset's 128 px:

* pure decode rate: the files decoded and preprocessed in a DataLoader with the same number of
  workers as the pipeline, no model;
* pure model rate: preprocessed batches already in memory through the model;
* medtransfer's streaming ``predict`` throughput (files/s), and its ratio to the slower of the two;
* a MONAI ``LoadImage``-based loop and a naive per-file loop (pydicom → preprocess → model, one
  image at a time) on the same files;
* peak RSS of ``medtransfer predict`` in a fresh process on 500 and on 5,000 files.

Usage: ``python benchmarks/inference_bench.py [--files 500] [--workers 2]``; writes
``benchmarks/results/inference.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "inference.json"


def make_folder(src: Path, dst: Path, n: int) -> list[Path]:
    files = sorted(src.rglob("*.dcm"))
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        target = dst / f"{i // 500:03d}" / f"img{i:05d}.dcm"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(files[i % len(files)], target)
        out.append(target)
    return out


def make_run(path: Path) -> Path:
    from medtransfer.backbones import get_weight_spec, load_backbone
    from medtransfer.config import load_config
    from medtransfer.data.preprocess import preprocess_spec
    from medtransfer.run import RunDirectory
    from medtransfer.run.checkpoint import model_payload
    from medtransfer.transfer import TransferModel

    cfg = load_config("xray")
    spec_w = get_weight_spec(cfg.model.backbone)
    backbone, _ = load_backbone(spec_w, 1, "pretrained")
    model = TransferModel(backbone, 2)
    spec = preprocess_spec(cfg.data, 1, spec_w.mean, spec_w.std)
    path.mkdir(parents=True, exist_ok=True)
    RunDirectory(path).save_model(model_payload(model, cfg.to_dict(), spec.to_dict(), ["no_finding", "opacity"],
                                                cfg.model.backbone, operating_point={"threshold": 0.5}))
    return path


class _Files(Dataset):
    def __init__(self, files, pre):
        self.files, self.pre = files, pre

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.pre.load_dicom(str(self.files[i]))


def decode_rate(files, pre, workers, batch_size) -> float:
    loader = DataLoader(_Files(files, pre), batch_size=batch_size, num_workers=workers)
    t = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t)


@torch.no_grad()
def model_rate(run, n, batch_size) -> float:
    x = torch.rand(batch_size, 1, run.pre.spec.size, run.pre.spec.size)
    run.model(run.pre.normalize(x))  # warm-up
    t = time.perf_counter()
    done = 0
    while done < n:
        run.model(run.pre.normalize(x))
        done += batch_size
    return done / (time.perf_counter() - t)


def pipeline_rate(run, folder, out, workers, batch_size) -> float:
    from medtransfer.inference.batch import run_batch

    t = time.perf_counter()
    s = run_batch(run, folder, out, batch_size=batch_size, workers=workers, keep_rows=False)
    return sum(s.counts.values()) / (time.perf_counter() - t)


@torch.no_grad()
def monai_loop_rate(run, files, batch_size) -> float:
    from monai.transforms import LoadImage

    from medtransfer.data.preprocess import resize_square

    loader = LoadImage(image_only=True, reader="PydicomReader")
    t = time.perf_counter()
    batch = []
    for f in files:
        img = torch.as_tensor(np.asarray(loader(str(f)), dtype=np.float32)).squeeze()
        lo, hi = torch.quantile(img.flatten()[::7], torch.tensor([0.005, 0.995]))
        img = ((img - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        batch.append(resize_square(img[None], run.pre.spec.size))
        if len(batch) == batch_size:
            run.model(run.pre.normalize(torch.stack(batch)))
            batch = []
    if batch:
        run.model(run.pre.normalize(torch.stack(batch)))
    return len(files) / (time.perf_counter() - t)


@torch.no_grad()
def naive_loop_rate(run, files) -> float:
    import pydicom

    from medtransfer.data.preprocess import resize_square

    t = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            a = a.max() - a
        lo, hi = np.percentile(a, [0.5, 99.5])
        a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
        x = resize_square(torch.from_numpy(a)[None], run.pre.spec.size)[None]
        run.model(run.pre.normalize(x))
    return len(files) / (time.perf_counter() - t)


def peak_rss_mb(run_dir: Path, folder: Path, out: Path, workers: int) -> float:
    code = (
        "import resource, sys\n"
        "from medtransfer.inference import predict_folder\n"
        f"predict_folder({str(run_dir)!r}, {str(folder)!r}, {str(out)!r}, batch_size=32, device='cpu', workers={workers})\n"
        "self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(self_kb + child_kb)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500, help="folder size for the throughput comparison")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians are reported")
    args = ap.parse_args()
    torch.manual_seed(0)

    from medtransfer.data.demo import generate_demo_dataset
    from medtransfer.inference import load_run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = generate_demo_dataset(tmp / "src", n_patients=30, seed=3)
        folder = tmp / "in"
        files = make_folder(src / "images", folder, args.files)
        run_dir = make_run(tmp / "run")
        run = load_run(run_dir, device="cpu")

        rates: dict[str, list[float]] = {k: [] for k in ("decode", "model", "pipeline", "monai_loop", "naive_loop")}
        for rep in range(args.reps):
            rates["decode"].append(decode_rate(files, run.pre, args.workers, args.batch_size))
            rates["model"].append(model_rate(run, len(files), args.batch_size))
            rates["pipeline"].append(pipeline_rate(run, folder, tmp / f"p{rep}.csv", args.workers, args.batch_size))
            rates["monai_loop"].append(monai_loop_rate(run, files[: max(100, len(files) // 5)], args.batch_size))
            rates["naive_loop"].append(naive_loop_rate(run, files[: max(100, len(files) // 5)]))
            print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f}/s" for k, v in rates.items()), flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}

        big = tmp / "big"
        make_folder(src / "images", big, 5000)
        small = tmp / "small"
        make_folder(src / "images", small, 500)
        rss500 = peak_rss_mb(run_dir, small, tmp / "rss500.csv", args.workers)
        rss5000 = peak_rss_mb(run_dir, big, tmp / "rss5000.csv", args.workers)

    result = {
        "throughput_files_per_s": med["pipeline"],
        "decode_files_per_s": med["decode"],
        "model_images_per_s": med["model"],
        "throughput_vs_limit_ratio": med["pipeline"] / min(med["decode"], med["model"]),
        "monai_loop_files_per_s": med["monai_loop"],
        "naive_loop_files_per_s": med["naive_loop"],
        "speedup_vs_monai_loop": med["pipeline"] / med["monai_loop"],
        "speedup_vs_naive_loop": med["pipeline"] / med["naive_loop"],
        "peak_rss_mb_500": rss500,
        "peak_rss_mb_5000": rss5000,
        "settings": {"files": args.files, "workers": args.workers, "batch_size": args.batch_size, "reps": args.reps,
                     "model": "efficientnet_lite0.in1k, 1 channel, 128 px", "device": "cpu",
                     "image": "256x256 16-bit synthetic DX/CR DICOM", "torch_threads": torch.get_num_threads()},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": str(torch.__version__),
                    "platform": platform.platform()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
