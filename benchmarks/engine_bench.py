"""Engine benchmarks → benchmarks/results/engine.json.

1. ``engine_vs_minimal_loop_ratio``: seconds per epoch (train + validation predictions) of
   ``medtransfer.train.finetune`` over a minimal hand-written PyTorch loop on the same model
   (tiny_cnn at 64 px, fine-tune phase, no augmentation), data and batch size; the two are
   interleaved in pairs; the engine's epoch is the wall time between consecutive epoch ends, so its
   per-epoch bookkeeping (best-model copy, checkpoints, history) counts; the median of the
   per-pair ratios is reported.
2. ``feature_cache_speedup``: head-only epochs on a frozen EfficientNet-Lite0 (pip weights) at
   64 px, without and with the feature cache; median epoch seconds (the one-off cache build is
   reported separately).

Run: ``python benchmarks/engine_bench.py`` (CPU; about 4 minutes on 2 cores; run it alone — other jobs on the cores swamp the ratio).
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_train_engine import toy_npz  # noqa: E402

from medtransfer.backbones import get_weight_spec, load_backbone  # noqa: E402
from medtransfer.config import load_config  # noqa: E402
from medtransfer.data.datasets import ImageSet  # noqa: E402
from medtransfer.data.preprocess import Preprocessor, preprocess_spec  # noqa: E402
from medtransfer.data.samples import samples_from_npz  # noqa: E402
from medtransfer.train import finetune as ft  # noqa: E402
from medtransfer.transfer import TransferModel  # noqa: E402

NO_AUG = ["augment.rotate_degrees=0", "augment.scale=0", "augment.brightness=0", "augment.contrast=0"]


def minimal_loop_epochs(npz: Path, cfg, epochs: int) -> list[float]:
    """The reference: DataLoader → forward → BCE → backward → AdamW step; then validation."""
    torch.manual_seed(0)
    table = samples_from_npz(npz)
    backbone, _ = load_backbone(get_weight_spec(cfg.model.backbone), 1, "none")
    model = TransferModel(backbone, 2, "linear", cfg.model.dropout)
    pre = Preprocessor(preprocess_spec(cfg.data, 1, (0.5,), (0.5,)))
    train = ImageSet(table, table.subset("train"), pre)
    val = ImageSet(table, table.subset("val"), pre)
    tl = torch.utils.data.DataLoader(train, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    vl = torch.utils.data.DataLoader(val, batch_size=cfg.train.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for x, _ in tl:  # fill the decoded-image cache, as the engine's first epoch does
        pass
    for x, _ in vl:
        pass
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in tl:
            loss = loss_fn(model(pre.normalize(x)).view(-1), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        model.eval()
        with torch.no_grad():
            for x, _ in vl:
                torch.sigmoid(model(pre.normalize(x)))
        times.append(time.perf_counter() - t0)
    return times


class _EpochClock(logging.Handler):
    """Timestamps of the engine's end-of-epoch log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stamps: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("epoch "):
            self.stamps.append(time.perf_counter())


def engine_epochs(npz: Path, overrides: list[str], out: Path) -> list[float]:
    """Train + validation seconds of every epoch, as the engine's history records them."""
    res = ft.finetune(load_config("xray", overrides=overrides), data=npz, out_dir=out)
    return [h["seconds"] for h in res.history]


def engine_epoch_walls(npz: Path, overrides: list[str], out: Path) -> list[float]:
    """Wall seconds between consecutive epoch ends: train + validation + all the engine's per-epoch
    bookkeeping (best-model copy, model.pt, last.pt, history.csv). The first epoch (cache fill) has
    no predecessor and is not counted."""
    clock = _EpochClock()
    log = logging.getLogger("medtransfer.train.callbacks")  # the History callback logs each epoch
    level = log.level
    log.addHandler(clock)
    log.setLevel(logging.INFO)
    try:
        ft.finetune(load_config("xray", overrides=overrides), data=npz, out_dir=out)
    finally:
        log.removeHandler(clock)
        log.setLevel(level)
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="engine_bench_"))
    npz = toy_npz(work / "toy.npz", n=(1024, 256, 16), size=64)
    epochs, reps = 5, 20
    tiny = ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=64", "train.batch_size=32",
            "train.head_epochs=0", f"train.finetune_epochs={epochs}", "train.lr_schedule=constant",
            "train.class_weighting=false", "train.bn_policy=train", *NO_AUG]
    cfg = load_config("xray", overrides=tiny)
    eng, ref, paired = [], [], []
    for r in range(reps):  # interleaved pairs; the first epoch of each run (cache fill) is not timed
        # ABBA: which loop runs first alternates, so a drift of the machine's speed within a pair cancels
        if r % 2 == 0:
            b = minimal_loop_epochs(npz, cfg, epochs)[1:]
            a = engine_epoch_walls(npz, tiny, work / f"eng{r}")
        else:
            a = engine_epoch_walls(npz, tiny, work / f"eng{r}")
            b = minimal_loop_epochs(npz, cfg, epochs)[1:]
        eng += a
        ref += b
        paired.append(statistics.median(a) / statistics.median(b))
    # Epoch times on this shared 2-core machine wander by ±10 % between runs; the ratio of each
    # adjacent pair cancels most of that drift, and the median over the pairs is reported.
    ratio = statistics.median(paired)

    lite = ["model.backbone=efficientnet_lite0.in1k", "model.weights=pretrained", "data.size=64",
            "train.batch_size=32", "train.head_epochs=4", "train.finetune_epochs=0", "train.head_augment=false"]
    off, on, build = [], [], []
    for r in range(2):
        off += engine_epochs(npz, lite + ["train.feature_cache=off"], work / f"off{r}")[1:]
        t0 = time.perf_counter()
        sec = engine_epochs(npz, lite + ["train.feature_cache=on"], work / f"on{r}")
        total = time.perf_counter() - t0
        on += sec[1:]
        build.append(total - sum(sec))  # includes load, split, cache build and final evaluation
    speedup = statistics.median(off) / statistics.median(on)

    result = {
        "engine_vs_minimal_loop_ratio": round(ratio, 4),
        "engine_epoch_seconds_median": round(statistics.median(eng), 4),
        "minimal_loop_epoch_seconds_median": round(statistics.median(ref), 4),
        "engine_vs_minimal_paired_ratios": [round(x, 3) for x in paired],
        "engine_setup": "tiny_cnn.random, 64 px, batch 32, 1024 train / 256 val images; engine epoch = wall time "
                        "between consecutive epoch ends (train + val + best-model copy + model.pt/last.pt/history.csv "
                        f"writes); minimal loop = train + val; {reps} interleaved pairs (ABBA order) × {epochs - 1} "
                        "timed epochs",
        "feature_cache_speedup": round(speedup, 2),
        "head_epoch_seconds_no_cache_median": round(statistics.median(off), 4),
        "head_epoch_seconds_cache_median": round(statistics.median(on), 5),
        "cache_run_seconds_outside_epochs": [round(b, 2) for b in build],
        "feature_cache_setup": "efficientnet_lite0.in1k (pip weights), frozen, 64 px, batch 32, 512 train / 128 val, "
                               "head-only epochs incl. validation; first epoch (cache build / image decode) dropped",
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": machine(),
    }
    out = Path(__file__).resolve().parent / "results" / "engine.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
