"""Segmentation fine-tuning on the package's :class:`~medtransfer.train.trainer.Trainer`.

Phases: ``encoder_frozen`` (the decoder trains on a frozen pretrained encoder for
``train.freeze_encoder_epochs`` epochs; none for a random encoder), then ``finetune`` (the encoder at
``lr × encoder_lr_ratio``, its own optimizer parameter group from the start); the BatchNorm policy is
``train.bn_policy``; cosine decay per step over the whole run. Validation Dice (sliding window, every
``train.val_every`` epochs) is the monitored metric of best-model selection (``train.select_best``)
and early stopping (``train.patience``); ``train.time_limit_minutes``, AMP on CUDA, ``torchrun``
DDP and exact ``resume`` (``last.pt`` after every epoch) come with the Trainer.

Run directory: ``model.pt`` (``format: medtransfer-seg/1``), ``config.yaml``, ``last.pt``,
``history.csv``, ``split.csv``, ``metrics.json`` + ``segmentation_<split>.csv`` (per case, on each
case's original grid) from :func:`medtransfer.metrics.write_segmentation_report`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medtransfer.config import check_weights_file
from medtransfer.errors import DataError
from medtransfer.metrics import dice_per_label, evaluate_segmentation, write_segmentation_report
from medtransfer.metrics.html_report import write_html_report
from medtransfer.options import BNPolicy, FreezeMode
from medtransfer.run import RunDirectory
from medtransfer.run.checkpoint import SEG_MODEL_FORMAT
from medtransfer.segmentation.config import SegConfig, seg_config_from_dict
from medtransfer.segmentation.data import PatchDataset, PreparedCase, discover_cases, prepare_cases, split_cases
from medtransfer.segmentation.model import build_segmentation_model
from medtransfer.segmentation.sliding import predict_probabilities, segment_volume
from medtransfer.train import callbacks as cb
from medtransfer.train.trainer import Phase, Trainer
from medtransfer.transfer.plan import apply_plan
from medtransfer.utils.device import amp_dtype_for, autocast_for, pick_device
from medtransfer.utils.distributed import Distributed, init_distributed, rank_device
from medtransfer.utils.rng import seed_everything

logger = logging.getLogger(__name__)

REPORT_SECONDS = 30.0
"""Reserved under a time limit for the final report (per-case HD95/NSD, bootstrap CIs, overlays)."""


def preprocessing_of(cfg: SegConfig) -> dict[str, Any]:
    """What prediction needs to reproduce the training inputs (stored in ``model.pt``)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    return {"spacing": list(d.spacing), "normalize": d.normalize, "zscore_nonzero": d.zscore_nonzero,
            "window": list(d.window), "dims": m.dims, "context": m.context, "slice_axis": m.slice_axis,
            "patch_size": list(t.patch_size), "overlap": t.overlap, "sw_batch_size": t.sw_batch_size}


def _in_channels(cfg: SegConfig) -> int:
    return 2 * cfg.model.context + 1 if cfg.model.dims == 2 else 1


@dataclass
class SegData:
    """The cases of a run: split, preprocessed, with their label names."""

    split: dict[str, str]
    train: list[PreparedCase]
    evaluation: list[PreparedCase]
    label_names: list[str]
    unreadable: list[dict[str, str]]

    def cases(self, split: str) -> list[PreparedCase]:
        return [c for c in self.evaluation if self.split[c.case_id] == split]

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(v == s for v in self.split.values()) for s in ("train", "val", "test", "unused")}


def prepare_data(cfg: SegConfig) -> SegData:
    """Discover, split (case-level, seeded), subsample and preprocess the cases of ``data.path``."""
    d = cfg.data
    cases, names = discover_cases(d.path)
    cases = sorted(cases, key=lambda c: c.case_id)[: d.max_cases or None]
    split = split_cases([c.case_id for c in cases], d.val_fraction, d.test_fraction, d.seed)
    train_ids = sorted(c.case_id for c in cases if split[c.case_id] == "train")
    if d.train_fraction < 1.0:
        keep = max(1, int(round(len(train_ids) * d.train_fraction)))
        chosen = set(np.random.default_rng(d.seed + 1).permutation(train_ids)[:keep].tolist())
        split.update({cid: "unused" for cid in train_ids if cid not in chosen})
    prep = preprocessing_of(cfg)
    train, bad = prepare_cases([c for c in cases if split[c.case_id] == "train"], prep)
    evaluation, bad2 = prepare_cases([c for c in cases if split[c.case_id] in ("val", "test")], prep, keep_original=True)
    if not train:
        raise DataError(f"No readable training cases in '{d.path}' ({len(bad)} failed, e.g. {bad[:1]}).")
    n_labels = max(int(max(c.label.max() for c in train)), 1) + 1
    label_names = list(d.label_names) or (names or ["background"] + [f"label_{k}" for k in range(1, n_labels)])
    if len(label_names) < n_labels:
        raise DataError(f"Masks hold labels up to {n_labels - 1} but only {len(label_names)} label names are given.")
    data = SegData(split, train, evaluation, label_names, bad + bad2)
    logger.info("cases: %s (%d unreadable); labels: %s", data.counts, len(data.unreadable), label_names)
    return data


class DiceValidation:
    """Mean Dice per label over the validation cases (sliding window), every ``every`` epochs and at
    the last one; ``{}`` on the others. Its duration budgets the final evaluation under a time limit."""

    def __init__(self, model: torch.nn.Module, cases: list[PreparedCase], label_names: list[str],
                 prep: dict[str, Any], every: int, last_epoch: int):
        self.model, self.cases, self.names, self.prep = model, cases, label_names, prep
        self.every, self.last_epoch = every, last_epoch
        self.seconds: float | None = None

    def __call__(self, epoch: int) -> dict[str, float]:
        if not self.cases or (epoch % self.every and epoch != self.last_epoch):
            return {}
        t0 = time.perf_counter()
        labels = list(range(1, len(self.names)))
        dices = np.array([list(dice_per_label(self._predict(c), c.label, labels).values()) for c in self.cases])
        self.seconds = time.perf_counter() - t0
        per = np.nanmean(dices, axis=0)
        return {"val_dice_mean": float(np.nanmean(per)), **{f"val_dice_{n}": float(v) for n, v in zip(self.names[1:], per)}}

    def _predict(self, case: PreparedCase) -> np.ndarray:
        return predict_probabilities(self.model, case.image, self.prep).argmax(0).numpy()

    def final_estimate(self, n_eval: int) -> float | None:
        return None if self.seconds is None else self.seconds * n_eval / len(self.cases) + REPORT_SECONDS


def _optimizer(model: torch.nn.Module, cfg: SegConfig, pretrained: bool) -> torch.optim.Optimizer:
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": list(model.backbone.parameters()), "lr": t.lr * (t.encoder_lr_ratio if pretrained else 1.0),
          "name": "encoder"},
         {"params": list(model.head.parameters()), "lr": t.lr, "name": "decoder"}], weight_decay=t.weight_decay)


def _phases(cfg: SegConfig, loader: torch.utils.data.DataLoader, validate: DiceValidation,
            freeze_epochs: int) -> list[Phase]:
    def batches() -> _Pairs:
        return _Pairs(loader)

    return [Phase("encoder_frozen", freeze_epochs, batches, validate, info={"encoder_trainable": False}),
            Phase("finetune", cfg.train.epochs - freeze_epochs, batches, validate, info={"encoder_trainable": True})]


class _Pairs:
    """A loader of ``{"image", "label"}`` dicts as ``(x, y)`` pairs, with its length."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        return ((b["image"], b["label"]) for b in self.loader)


def _callbacks(cfg: SegConfig, run: RunDirectory, dataset: PatchDataset, validate: DiceValidation,
               freeze_epochs: int, n_eval: int, extra: dict[str, Any], progress: bool, main: bool) -> list[cb.Callback]:
    t = cfg.train
    bn = t.bn_policy

    def plan_for(epoch: int) -> tuple[str, str]:
        return (FreezeMode.BACKBONE.value if epoch <= freeze_epochs else FreezeMode.NONE.value, bn)

    def describe(row: dict[str, Any]) -> str:
        return f"loss {row['train_loss']:.4f}" + (f", val Dice {row['val_dice_mean']:.4f}" if "val_dice_mean" in row else "")

    callbacks: list[cb.Callback] = [
        cb.Unfreeze(plan_for, lambda model, freeze, bn_policy: apply_plan(model, freeze, bn_policy=bn_policy)),
        cb.LRSchedule(cb.cosine_factor, t.epochs * t.steps_per_epoch),
        cb.DatasetState(dataset),
        cb.History(run, describe),
        cb.LastCheckpoint(run, extra),
        cb.ProgressBar(t.steps_per_epoch, progress and main, lambda r: describe(r)),
    ]
    if t.select_best:
        callbacks.append(cb.BestModel("val_dice_mean", "max"))
    if t.patience:
        callbacks.append(cb.EarlyStopping("val_dice_mean", t.patience, "max", phases=("finetune",)))
    if t.time_limit_minutes > 0:
        callbacks.append(cb.TimeLimit(time.perf_counter() + 60 * t.time_limit_minutes,
                                      lambda: validate.final_estimate(n_eval)))
    return callbacks


def _lr_columns(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {"lr_decoder": optimizer.param_groups[1]["lr"], "lr_encoder": optimizer.param_groups[0]["lr"]}


def train_segmentation(cfg: SegConfig, out_dir: str | os.PathLike[str], *, resume: bool = False,
                       overwrite: bool = False, progress: bool = False,
                       callbacks: tuple[cb.Callback, ...] = ()) -> dict[str, Any]:
    """Train a segmentation model as configured and write the run directory; returns ``metrics.json``.

    ``resume=True`` continues the interrupted run in ``out_dir`` exactly from its ``last.pt`` (its
    own config; ``cfg`` is ignored). ``overwrite`` replaces an earlier run there (otherwise a folder
    that holds files is refused)."""
    t0 = time.time()
    state = RunDirectory(out_dir).load_last() if resume else None
    if state is not None:
        cfg = seg_config_from_dict(state["config"])
    check_weights_file(cfg.model.weights)
    device = pick_device(cfg.train.device)
    dist = init_distributed(device)
    device = rank_device(device, dist)
    run = RunDirectory(out_dir, dist.main)
    if state is None:
        run.open_new(overwrite).write_config(cfg.to_yaml())
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    gen = seed_everything(cfg.train.seed)
    data = prepare_data(cfg)
    trained, report = _fit(cfg, data, run, device, dist, gen, state, progress, callbacks)
    return _finish(cfg, data, run, trained, report, t0)


def _fit(cfg: SegConfig, data: SegData, run: RunDirectory, device: torch.device, dist: Distributed,
         gen: torch.Generator, state: dict[str, Any] | None, progress: bool,
         extra_callbacks: tuple[cb.Callback, ...]) -> tuple[Any, Any]:
    """Build the model, the patch sampler and the policies, and run the Trainer."""
    m, t = cfg.model, cfg.train
    model, report = build_segmentation_model(m.encoder, dims=m.dims, in_channels=_in_channels(cfg),
                                             num_classes=len(data.label_names), weights=m.weights,
                                             decoder_channels=m.decoder_channels, inflate=m.inflate, stages=m.stages)
    model.to(device)
    pretrained = m.weights != "none"
    freeze_epochs = min(t.freeze_encoder_epochs, t.epochs) if pretrained else 0
    if t.freeze_encoder_epochs and not pretrained:
        logger.info("encoder is randomly initialised: train.freeze_encoder_epochs=%d ignored", t.freeze_encoder_epochs)
    # every rank samples its own patches (seed + rank); a single process samples as before the Trainer
    dataset = PatchDataset(data.train, dims=m.dims, patch=t.patch_size, length=t.steps_per_epoch * t.batch_size,
                           pos_fraction=t.pos_fraction, context=m.context, slice_axis=m.slice_axis,
                           seed=t.seed + dist.rank)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, num_workers=0)
    validate = DiceValidation(model, data.cases("val"), data.label_names, preprocessing_of(cfg), t.val_every, t.epochs)
    amp_dtype = amp_dtype_for(t.amp, device)
    from monai.losses import DiceCELoss

    trainer = Trainer(model, _optimizer(model, cfg, pretrained), DiceCELoss(to_onehot_y=True, softmax=True),
                      device=device, autocast=autocast_for(device, amp_dtype), dist=dist, generator=gen,
                      scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16), lr_columns=_lr_columns,
                      callbacks=[*_callbacks(cfg, run, dataset, validate, freeze_epochs, len(data.evaluation),
                                             {"config": cfg.to_dict()}, progress, dist.main), *extra_callbacks])
    if state is not None:
        trainer.load_state_dict(state)
        logger.info("resuming %s after epoch %d", run.path, trainer.state.epoch)
    trainer.fit(_phases(cfg, loader, validate, freeze_epochs))
    model.eval()
    return trainer, report


def _finish(cfg: SegConfig, data: SegData, run: RunDirectory, trainer: Trainer, report: Any, t0: float) -> dict[str, Any]:
    """``model.pt``, ``split.csv`` and the report of the final model on the validation / test cases."""
    model, m = trainer.model, cfg.model
    run.save_model({"format": SEG_MODEL_FORMAT, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "config": cfg.to_dict(), "preprocessing": preprocessing_of(cfg), "label_names": data.label_names,
                    "model": {"encoder": m.encoder, "weights": m.weights, "dims": m.dims, "in_channels": _in_channels(cfg),
                              "decoder_channels": list(m.decoder_channels), "inflate": m.inflate, "stages": m.stages},
                    "torch_version": str(torch.__version__)})
    run.write_rows("split.csv", [{"case_id": k, "split": v} for k, v in sorted(data.split.items())])
    if not run.main:
        return {}
    metrics = _report(cfg, data, run, model, report, t0)
    metrics["training"].update(epochs=cfg.train.epochs, epochs_run=trainer.state.epoch,
                               stopped=trainer.state.stop_reason)
    run.write_metrics(metrics)
    write_html_report(run.path)  # last: the page shows every file of the run
    return metrics


def _report(cfg: SegConfig, data: SegData, run: RunDirectory, model: Any, report: Any, t0: float) -> dict[str, Any]:
    from medtransfer.backbones import get_weight_spec

    prep, t = preprocessing_of(cfg), cfg.train
    scored: dict[str, list] = {"val": [], "test": []}
    images = {}
    for c in data.evaluation:
        scored[data.split[c.case_id]].append((c.case_id, segment_volume(model, c.volume, prep), c.true,
                                              c.volume.spacing))
        images[c.case_id] = c.volume.array
    info = {"model_name": f"{cfg.model.encoder} U-Net ({cfg.model.dims}D)", "modality": cfg.modality,
            "encoder": cfg.model.encoder, "weights": {**get_weight_spec(cfg.model.encoder).to_dict(), "mode": cfg.model.weights},
            "load_report": report.summary().splitlines()[:3], "cases": data.counts,
            "unreadable_cases": data.unreadable, "train_minutes": round((time.time() - t0) / 60.0, 2)}
    main = "test" if scored["test"] else "val"
    metrics: dict[str, Any] = {"task": "segmentation", "label_names": data.label_names}
    if scored[main]:
        metrics = write_segmentation_report(run.path, cases=scored[main], label_names=data.label_names, split=main,
                                            images=images if t.overlay_plots else None, n_overlay=t.overlay_plots,
                                            extra_info=info, n_boot=200, write_metrics=False)
        if main == "test" and scored["val"]:
            metrics["val"] = evaluate_segmentation(scored["val"], data.label_names, n_boot=200)[1]
    metrics["training"] = {**info, "minutes": round((time.time() - t0) / 60.0, 2)}
    return metrics
