"""Segmentation fine-tuning: one readable loop from a :class:`SegConfig` to a run directory.

Run directory: ``model.pt`` (``format: medtransfer-seg/1``; state dict, config, preprocessing,
label names; loadable with ``torch.load(weights_only=True)``), ``config.yaml``, ``history.csv``,
``split.csv``, ``metrics.json`` + ``segmentation_<split>.csv`` (per case, on each case's original
grid) from :func:`medtransfer.metrics.write_segmentation_report`.

Transfer plan: the encoder is frozen (``apply_plan(..., "backbone")``) for the first
``freeze_encoder_epochs`` epochs, then trains at ``lr × encoder_lr_ratio`` (its own optimizer
parameter group from the start); the BatchNorm policy is ``train.bn_policy``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medtransfer.errors import DataError
from medtransfer.segmentation.config import SegConfig
from medtransfer.segmentation.inference import CHECKPOINT_FORMAT, predict_probabilities, segment_volume

logger = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def preprocessing_of(cfg: SegConfig) -> dict[str, Any]:
    """What prediction needs to reproduce the training inputs (stored in ``model.pt``)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    return {"spacing": list(d.spacing), "normalize": d.normalize, "zscore_nonzero": d.zscore_nonzero,
            "window": list(d.window), "dims": m.dims, "context": m.context, "slice_axis": m.slice_axis,
            "patch_size": list(t.patch_size), "overlap": t.overlap, "sw_batch_size": t.sw_batch_size}


def _in_channels(cfg: SegConfig) -> int:
    return 2 * cfg.model.context + 1 if cfg.model.dims == 2 else 1


def _dice_per_class(pred: np.ndarray, true: np.ndarray, n: int) -> list[float]:
    out = []
    for k in range(1, n):
        p, t = pred == k, true == k
        denom = p.sum() + t.sum()
        out.append(float("nan") if denom == 0 else 2.0 * float((p & t).sum()) / float(denom))
    return out


def _set_encoder_trainable(model, trainable: bool, bn_policy: str) -> None:
    from medtransfer.transfer.plan import apply_plan

    apply_plan(model, "none" if trainable else "backbone", bn_policy=bn_policy)


def train_segmentation(cfg: SegConfig, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train a segmentation model as configured and write the run directory; returns ``metrics.json``."""
    from monai.losses import DiceCELoss

    from medtransfer.metrics import evaluate_segmentation, write_segmentation_report
    from medtransfer.metrics._utils import write_csv_atomic, write_json_atomic
    from medtransfer.segmentation.data import PatchDataset, discover_cases, prepare_cases, split_cases
    from medtransfer.segmentation.model import build_segmentation_model

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d, m, t = cfg.data, cfg.model, cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    _seed_everything(t.seed)

    cases, names = discover_cases(d.path)
    cases = sorted(cases, key=lambda c: c.case_id)
    if d.max_cases:
        cases = cases[: d.max_cases]
    split = split_cases([c.case_id for c in cases], d.val_fraction, d.test_fraction, d.seed)
    train_ids = sorted(c.case_id for c in cases if split[c.case_id] == "train")
    if d.train_fraction < 1.0:
        keep = max(1, int(round(len(train_ids) * d.train_fraction)))
        chosen = set(np.random.default_rng(d.seed + 1).permutation(train_ids)[:keep].tolist())
        for cid in train_ids:
            if cid not in chosen:
                split[cid] = "unused"
    prep = preprocessing_of(cfg)
    train_cases, bad = prepare_cases([c for c in cases if split[c.case_id] == "train"], prep)
    eval_cases, bad2 = prepare_cases([c for c in cases if split[c.case_id] in ("val", "test")], prep, keep_original=True)
    bad += bad2
    if not train_cases:
        raise DataError(f"No readable training cases in '{d.path}' ({len(bad)} failed, e.g. {bad[:1]}).")
    n_labels = max(int(max(c.label.max() for c in train_cases)), 1) + 1
    label_names = list(d.label_names) or (names or ["background"] + [f"label_{k}" for k in range(1, n_labels)])
    if len(label_names) < n_labels:
        raise DataError(f"Masks hold labels up to {n_labels - 1} but only {len(label_names)} label names are given.")
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "val", "test", "unused")}
    logger.info("cases: %s (%d unreadable); labels: %s", counts, len(bad), label_names)

    model, report = build_segmentation_model(m.encoder, dims=m.dims, in_channels=_in_channels(cfg),
                                             num_classes=len(label_names), weights=m.weights,
                                             decoder_channels=m.decoder_channels, inflate=m.inflate,
                                             stages=m.stages)
    pretrained = m.weights != "none"
    freeze_epochs = t.freeze_encoder_epochs if pretrained else 0
    if t.freeze_encoder_epochs and not pretrained:
        logger.info("encoder is randomly initialised: train.freeze_encoder_epochs=%d ignored", t.freeze_encoder_epochs)
    enc_params = list(model.backbone.parameters())
    head_params = list(model.head.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": enc_params, "lr": t.lr * (t.encoder_lr_ratio if pretrained else 1.0), "name": "encoder"},
         {"params": head_params, "lr": t.lr, "name": "decoder"}], weight_decay=t.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    total_steps = t.epochs * t.steps_per_epoch
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    dataset = PatchDataset(train_cases, dims=m.dims, patch=t.patch_size, length=t.steps_per_epoch * t.batch_size,
                           pos_fraction=t.pos_fraction, context=m.context, slice_axis=m.slice_axis, seed=t.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, num_workers=0)
    val_cases = [c for c in eval_cases if split[c.case_id] == "val"]

    history: list[dict[str, Any]] = []
    best = (-1.0, None)
    step = 0
    for epoch in range(1, t.epochs + 1):
        encoder_trains = epoch > freeze_epochs
        _set_encoder_trainable(model, encoder_trains, t.bn_policy)
        model.train()
        te, losses = time.time(), []
        for batch in loader:
            frac = step / max(total_steps, 1)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine decay per step
            loss = loss_fn(model(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        row: dict[str, Any] = {"epoch": epoch, "train_loss": float(np.mean(losses)), "encoder_trainable": encoder_trains,
                               "lr_decoder": optimizer.param_groups[1]["lr"], "lr_encoder": optimizer.param_groups[0]["lr"]}
        if val_cases and (epoch % t.val_every == 0 or epoch == t.epochs):
            dices = np.array([_dice_per_class(predict_probabilities(model, c.image, prep).argmax(0).numpy(), c.label,
                                              len(label_names)) for c in val_cases])
            per = np.nanmean(dices, axis=0)
            row["val_dice_mean"] = float(np.nanmean(per))
            for name, v in zip(label_names[1:], per):
                row[f"val_dice_{name}"] = float(v)
            if t.select_best and row["val_dice_mean"] > best[0]:
                best = (row["val_dice_mean"], {k: v.detach().clone() for k, v in model.state_dict().items()})
        row["seconds"] = round(time.time() - te, 1)
        history.append(row)
        logger.info("epoch %d/%d loss %.4f%s (%.0fs)", epoch, t.epochs, row["train_loss"],
                    f" val dice {row['val_dice_mean']:.4f}" if "val_dice_mean" in row else "", row["seconds"])
    if t.select_best and best[1] is not None:
        model.load_state_dict(best[1])
    train_minutes = (time.time() - t0) / 60.0

    ckpt = {"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "config": cfg.to_dict(),
            "preprocessing": prep, "label_names": label_names,
            "model": {"encoder": m.encoder, "weights": m.weights, "dims": m.dims, "in_channels": _in_channels(cfg),
                      "decoder_channels": list(m.decoder_channels), "inflate": m.inflate,
                      "stages": m.stages},
            "torch_version": str(torch.__version__)}
    tmp = out / ".model.pt.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    columns = list(dict.fromkeys(k for r in history for k in r))
    write_csv_atomic(out / "history.csv", history, columns)
    write_csv_atomic(out / "split.csv", [{"case_id": k, "split": v} for k, v in sorted(split.items())], ["case_id", "split"])

    model.eval()
    scored: dict[str, list] = {"val": [], "test": []}
    images = {}
    for c in eval_cases:
        pred = segment_volume(model, c.volume, prep)
        scored[split[c.case_id]].append((c.case_id, pred, c.true, c.volume.spacing))
        images[c.case_id] = c.volume.array
    from medtransfer.backbones import get_weight_spec

    info = {"model_name": f"{m.encoder} U-Net ({m.dims}D)", "modality": cfg.modality, "encoder": m.encoder,
            "weights": {**get_weight_spec(m.encoder).to_dict(), "mode": m.weights},
            "load_report": report.summary().splitlines()[:3],
            "cases": counts, "unreadable_cases": bad, "train_minutes": round(train_minutes, 2)}
    main = "test" if scored["test"] else "val"
    if scored[main]:
        metrics = write_segmentation_report(out, cases=scored[main], label_names=label_names, split=main,
                                            images=images if t.overlay_plots else None, n_overlay=t.overlay_plots,
                                            extra_info=info, n_boot=200)
        if main == "test" and scored["val"]:
            metrics["val"] = evaluate_segmentation(scored["val"], label_names, n_boot=200)[1]
    else:
        metrics = {"task": "segmentation", "label_names": label_names}
    metrics["training"] = {**info, "minutes": round((time.time() - t0) / 60.0, 2), "epochs": t.epochs}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
