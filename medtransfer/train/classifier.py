"""One classification fit on the Trainer, top to bottom.

1. :func:`prepare` — samples table (demo / folder + CSV / MedMNIST ``.npz``), the task resolved from
   the labels, patient-grouped split, leakage check, training fraction, validation cap;
2. :func:`build` — backbone + weights (load report), new head, preprocessing, datasets and loaders,
   loss, and a real batch checked against the weights' input contract;
3. :func:`plan_phases` — ``head`` epochs on the frozen backbone (on features computed once when
   ``train.feature_cache`` allows), then ``finetune`` epochs with the backbone unfrozen (all at once
   or gradually, by layer group) at ``lr × backbone_lr_mult`` (discriminative: ``× layer_lr_ratio``
   for the first group);
4. :func:`plan_callbacks` — the policies around the loop: unfreezing, cosine / one-cycle / plateau,
   best model and early stopping on validation AUC, time limit, history, TensorBoard, ``last.pt``;
5. :class:`~medtransfer.train.trainer.Trainer` runs them; then validation and test metrics,
   predictions, plots and the model card, ``model.pt`` and ``metrics.json`` (:func:`finish`).

One process, or one per device under ``torchrun`` (DDP: rank 0 writes, validation predictions are
gathered from every rank). On CUDA: AMP, channels-last, pinned memory.
"""
from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from medtransfer._version import __version__
from medtransfer.backbones import LoadReport, WeightSpec, check_input_contract, get_weight_spec
from medtransfer.config import RunConfig, check_weights_file
from medtransfer.data.datasets import ImageSet, holds_volumes, input_channels, resolve_samples, volume_depth
from medtransfer.data.preprocess import Preprocessor, PreprocessSpec, preprocess_spec
from medtransfer.data.samples import Sample, SampleTable, cap_val, check_leakage, split_by_patient, split_report
from medtransfer.data.samples import subsample_train
from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import labelled_results, predict_loader, write_evaluation
from medtransfer.options import AdaptationMode, BNPolicy, FreezeMode, HeadSolver, LRSchedule, PlateauMonitor, Switch
from medtransfer.options import Task
from medtransfer.options import UnfreezeSchedule, VolumeEncoder
from medtransfer.run import LoadedRun, RunDirectory
from medtransfer.run.checkpoint import model_payload
from medtransfer.run.report import finish_report
from medtransfer.train import callbacks as cb
from medtransfer.train.augment import augment_batch
from medtransfer.train.head_solver import fit_logistic_head
from medtransfer.train.trainer import Phase, Trainer
from medtransfer.train.validation import Validation
from medtransfer.transfer import TaskLoss, TransferModel, class_weights, group_learning_rates, layer_groups
from medtransfer.transfer import adaptation
from medtransfer.transfer.tasks import resolve_task
from medtransfer.transfer.volume import build_backbone, is_sliced
from medtransfer.utils.device import amp_dtype_for, autocast_for, compute_info, pick_device
from medtransfer.utils.distributed import Distributed
from medtransfer.utils.rng import seed_everything

logger = logging.getLogger(__name__)

REPORT_SECONDS = 15.0
"""Reserved under a time limit for writing the report (bootstrap CIs, plots) after the final pass."""


@dataclass
class FinetuneResult:
    """What a finished run produced (everything is also on disk in ``run_dir``)."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    load_report: LoadReport
    split_report: dict[str, Any] = field(default_factory=dict)


# ---- 1. data --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A split samples table and the config with the data's ``auto`` values resolved."""

    cfg: RunConfig
    table: SampleTable
    splits: dict[str, Any]
    data: str | None = None
    labels: str | None = None
    demo: bool = False
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Images left out because they cannot be used (``data.skip_bad_images``), with the reason."""
    heldout_val: dict[str, Any] | None = None
    """A fit on train + val (``auto``'s cross-validation protocol) has no validation split of its own: it
    trains its planned epochs, keeps the last, and reports these out-of-fold predictions as ``val``."""
    selection: dict[str, Any] | None = None
    """How ``train.adaptation = auto`` chose this fit's mode (recorded in metrics.json and the model card)."""

    def subset(self, split: str) -> list[Sample]:
        return self.table.subset(split)


def prepare(cfg: RunConfig, data: Any = None, labels: Any = None, samples: SampleTable | None = None) -> Prepared:
    """Resolve the samples, the task, the split and the subsets of a run (see the module docstring)."""
    cfg = copy.deepcopy(cfg)
    check_weights_file(cfg.model.weights)
    table = samples if samples is not None else resolve_samples(data, labels, cfg.data.classes,
                                                                cfg.data.outside_paths)
    if table.num_classes < 2:
        raise DataError("The labels hold a single class; fine-tuning needs at least two.")
    cfg.model.task = _resolved_task(cfg.model.task, table)
    cfg.model.volume_encoder = _resolved_volume_encoder(cfg.model, table)
    _split_and_subsample(table, cfg)
    splits = split_report(table)
    if not table.subset("train") or not table.subset("val"):
        raise DataError(f"Need training and validation samples; the split gave {splits}.")
    return Prepared(cfg, table, splits, None if data is None else str(data), None if labels is None else str(labels),
                    demo=data is None and samples is None)


def _resolved_task(task: str, table: SampleTable) -> str:
    """The task the labels allow (recorded in config.yaml instead of ``auto``)."""
    if table.task == Task.MULTILABEL:
        if task not in (Task.AUTO, Task.MULTILABEL):
            raise ConfigError(f"The labels are 0/1 vectors (multi-label); model.task = {task} needs one class per "
                              "image. Use auto or multilabel.")
        return Task.MULTILABEL.value
    if task == Task.MULTILABEL:
        raise ConfigError("model.task = multilabel needs 0/1 label vectors (e.g. a .npz with (N, K) labels).")
    return resolve_task(task, table.num_classes).value


def _resolved_volume_encoder(model_cfg: Any, table: SampleTable) -> str:
    """How volumes reach the backbone (recorded in config.yaml instead of ``auto``). A 2D backbone takes a
    ``.npz``'s volumes (one depth) as channels, the measured default; volume files of any depth (NIfTI,
    DICOM series) go slice by slice. ``channels`` (nothing to choose) for images and 3D backbones."""
    choice, volumes = model_cfg.volume_encoder, holds_volumes(table)
    if get_weight_spec(model_cfg.backbone).dims == 3 or not volumes:
        if choice in (VolumeEncoder.SLICES, VolumeEncoder.VIEWS):
            raise ConfigError(f"model.volume_encoder = {choice} takes volumes through a 2D backbone, but "
                              f"{'the backbone is 3D' if volumes else 'the data are 2D images'}; leave it at auto.")
        return VolumeEncoder.CHANNELS.value
    if choice == VolumeEncoder.AUTO:
        return (VolumeEncoder.CHANNELS if table.source == "npz" else VolumeEncoder.SLICES).value
    return VolumeEncoder(choice).value


def _split_and_subsample(table: SampleTable, cfg: RunConfig) -> None:
    """Patient-grouped split where the table has none (``train.seed``), the leakage check (also for
    user-supplied splits), then the stratified ``data.train_fraction`` of the training patients and
    at most ``data.val_max`` validation images."""
    if any(s.split is None for s in table.samples):
        split_by_patient(table, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed)
    check_leakage(table.samples)
    subsample_train(table, cfg.data.train_fraction, cfg.train.seed)
    n_val = len(table.subset("val"))
    kept = len(cap_val(table, cfg.data.val_max, cfg.train.seed).subset("val"))
    if kept < n_val:
        logger.info("model selection on %d of %d validation images (data.val_max=%d)", kept, n_val, cfg.data.val_max)


def drop_unusable(prep: Prepared, pre: Preprocessor) -> list[dict[str, str]]:
    """Decode every sample once; leave out those that cannot be used (unreadable, NaN / infinite values),
    each logged with its reason; the split report is recounted."""
    table = prep.table
    probe = ImageSet(table, table.samples, pre, cache=False)
    bad: list[dict[str, str]] = []
    for i, s in enumerate(table.samples):
        try:
            probe.load(i)
        except DataError as exc:
            bad.append({"path": probe.describe(i), "patient_id": s.patient_id, "split": str(s.split), "reason": str(exc)})
    if bad:
        dropped = {b["path"] for b in bad}
        table.samples = [s for i, s in enumerate(table.samples) if probe.describe(i) not in dropped]
        prep.splits.update(split_report(table))
        for b in bad:
            logger.warning("left out (data.skip_bad_images): %s", b["reason"])
        if not table.subset("train") or not table.subset("val"):
            raise DataError(f"After leaving out {len(bad)} unusable image(s) no training or validation images remain.")
    return bad


def resolve_auto(cfg: RunConfig) -> RunConfig:
    """The run's remaining ``auto`` switches made explicit: the BatchNorm policy (frozen for pretrained
    weights, trained for random ones) and the feature cache (on when the head phase does not augment, and
    always for a linear probe)."""
    cfg = copy.deepcopy(cfg)
    if cfg.train.bn_policy == BNPolicy.AUTO:
        cfg.train.bn_policy = (BNPolicy.TRAIN if cfg.model.weights == "none" else BNPolicy.FROZEN).value
    if cfg.train.feature_cache == Switch.AUTO:  # a linear probe only ever trains the head: cache its features
        probe = cfg.train.adaptation == AdaptationMode.LINEAR_PROBE
        cfg.train.feature_cache = (Switch.OFF if cfg.train.head_augment and not probe else Switch.ON).value
    return cfg


# ---- 2. model, data loaders, loss ---------------------------------------------------------------------
@dataclass
class Setup:
    """Everything one fit trains and evaluates with."""

    model: TransferModel
    report: LoadReport
    wspec: WeightSpec
    pre: Preprocessor
    device: torch.device
    dist: Distributed
    amp_dtype: torch.dtype | None
    channels_last: bool
    train_loader: DataLoader
    eval_loaders: dict[str, DataLoader]
    loss_fn: nn.Module
    generator: torch.Generator
    samplers: list[DistributedSampler]
    head_fit: dict[str, Any] | None = None
    """The closed-form head's choice (``train.head_solver=logistic``), once fitted."""

    @property
    def spec(self) -> PreprocessSpec:
        return self.pre.spec

    @property
    def autocast(self) -> Any:
        return autocast_for(self.device, self.amp_dtype)


def build(prep: Prepared, device: torch.device, dist: Distributed, gen: torch.Generator) -> Setup:
    """Backbone + head, preprocessing, loaders and loss of a prepared run; checks a real batch against
    the weights' input contract (channels, dims, value range) before any training."""
    cfg, table = prep.cfg, prep.table
    wspec = get_weight_spec(cfg.model.backbone)
    channels = input_channels(table) if wspec.dims == 2 else 1  # a 3D backbone takes whole volumes
    backbone, report = build_backbone(wspec, cfg.model, channels, cfg.model.weights, input_size=cfg.data.size)
    model = TransferModel(backbone, table.num_classes, cfg.model.head, cfg.model.dropout, cfg.model.task,
                          cfg.model.slice_pooling).to(device)
    pre = Preprocessor(_preprocess_spec(cfg, wspec, table, channels))
    if cfg.data.skip_bad_images and not prep.skipped:
        prep.skipped = drop_unusable(prep, pre)
    amp_dtype = amp_dtype_for(cfg.train.amp, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last and wspec.dims == 2
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, samplers, eval_loaders = _loaders(prep, pre, device, dist, gen)
    weight = class_weights(model.task, [s.label for s in prep.subset("train")], model.num_classes) \
        if cfg.train.class_weighting else None
    loss_fn = TaskLoss(model.task, model.num_classes, weight).to(device)
    first = torch.stack([train_loader.dataset[i][0] for i in range(min(len(train_loader.dataset), cfg.train.batch_size))])
    check_input_contract(pre.normalize(first), wspec, channels=pre.spec.channels, dims=wspec.dims)
    return Setup(model, report, wspec, pre, device, dist, amp_dtype, channels_last, train_loader, eval_loaders,
                 loss_fn, gen, samplers)


def _preprocess_spec(cfg: RunConfig, wspec: WeightSpec, table: SampleTable, channels: int) -> PreprocessSpec:
    """A slice encoder's volumes are ``(depth, size, size)`` (a row of slices per volume); other runs take
    images, or a 3D backbone's cubes."""
    if is_sliced(cfg.model, wspec.dims):
        depth = volume_depth(table, cfg.data.size)
        return preprocess_spec(cfg.data, depth, wspec.mean, wspec.std, 3, wspec.ct, depth=depth)
    return preprocess_spec(cfg.data, channels, wspec.mean, wspec.std, wspec.dims, wspec.ct)


def _loaders(prep: Prepared, pre: Preprocessor, device: torch.device, dist: Distributed,
             gen: torch.Generator) -> tuple[DataLoader, list[DistributedSampler], dict[str, DataLoader]]:
    cfg, table = prep.cfg, prep.table
    kw = dict(batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    train_set = ImageSet(table, prep.subset("train"), pre, cfg.data.cache)
    drop_last = len(train_set) > cfg.train.batch_size * dist.world
    sampler = DistributedSampler(train_set, seed=cfg.train.seed, drop_last=drop_last) if dist.world > 1 else None
    train = DataLoader(train_set, shuffle=sampler is None, sampler=sampler, generator=gen, drop_last=drop_last, **kw)
    evals = {}
    for name in ("val", "test"):
        if prep.subset(name):
            ds = ImageSet(table, prep.subset(name), pre, cfg.data.cache)
            es = DistributedSampler(ds, shuffle=False) if dist.world > 1 else None
            evals[name] = DataLoader(ds, shuffle=False, sampler=es, **kw)
    return train, [sampler] if sampler is not None else [], evals


# ---- 3. phases -----------------------------------------------------------------------------------
def plan_phases(cfg: RunConfig, setup: Setup, validation: Validation) -> list[Phase]:
    """``head`` (frozen backbone; on cached features when ``train.feature_cache`` is on and this is a
    single process), then ``finetune`` (the network, augmented; what of it trains is the adaptation
    mode's). A linear probe spends every epoch in ``head``; a fit without a validation split
    (``Prepared.heldout_val``) validates nothing."""
    model, pre = setup.model, setup.pre
    head_epochs, finetune_epochs = adaptation.head_and_finetune_epochs(cfg.train.adaptation, cfg.train.head_epochs,
                                                                       cfg.train.finetune_epochs)
    has_val = "val" in setup.eval_loaders
    cached = cfg.train.feature_cache == Switch.ON and setup.dist.world == 1
    if cfg.train.feature_cache == Switch.ON and not cached:
        logger.info("feature cache off under DDP (each rank would cache a different shard)")

    def images(augment: bool) -> Any:
        def prepare_batch(x: torch.Tensor) -> torch.Tensor:
            x = pre.normalize(augment_batch(x, cfg.augment, setup.generator) if augment else x)
            return x.contiguous(memory_format=torch.channels_last) if setup.channels_last else x
        return prepare_batch

    head = Phase("head", head_epochs, lambda: setup.train_loader, validation.images if has_val else _no_validation,
                 prepare=images(cfg.train.head_augment))
    if cached:
        solve = logistic_solver(cfg, setup, validation) if cfg.train.head_solver == HeadSolver.LOGISTIC else None
        head = Phase("head", head_epochs, lambda: validation.feature_loaders()["train"],
                     validation.features if has_val else _no_validation, forward=model.head, solve=solve)
    elif cfg.train.head_solver == HeadSolver.LOGISTIC:
        raise ConfigError("train.head_solver = logistic needs the feature cache, which is off under DDP (each rank "
                          "holds a shard). Run on one process, or use train.head_solver=sgd.")
    finetune = Phase("finetune", finetune_epochs, lambda: setup.train_loader,
                     validation.images if has_val else _no_validation, prepare=images(True))
    return [head, finetune]


def logistic_solver(cfg: RunConfig, setup: Setup, validation: Validation) -> Any:
    """The head phase's closed-form fit (see :mod:`medtransfer.train.head_solver`); returns the
    training loss of the fitted head on the cached features."""
    def solve() -> float:
        arrays = validation.feature_arrays()
        fit = fit_logistic_head(setup.model.head, setup.model.task, arrays["train"], arrays.get("val"),
                                balanced=cfg.train.class_weighting)
        setup.head_fit = {"solver": "logistic", "C": fit.C, "chosen_on": fit.chosen_on,
                          "auc_by_C": {f"{c:g}": round(float(v), 4) for c, v in fit.scores.items()}}
        x, y = (torch.from_numpy(a).to(setup.device) for a in arrays["train"])
        setup.model.head.eval()
        with torch.no_grad():
            return float(setup.loss_fn(setup.model.head(x.float()), y))
    return solve


def _no_validation(epoch: int) -> dict[str, float]:
    return {}


def unfreeze_plan(cfg: RunConfig) -> Any:
    """Epoch → the :func:`apply_plan` arguments: the backbone frozen for the head epochs, then the freeze
    mode, with one more layer group from the top every ``unfreeze_every`` epochs when gradual."""
    t = cfg.train
    head_epochs, _ = adaptation.head_and_finetune_epochs(t.adaptation, t.head_epochs, t.finetune_epochs)

    def plan_for(epoch: int) -> tuple[Any, ...]:
        if epoch <= head_epochs:
            return (FreezeMode.BACKBONE.value, t.bn_policy, t.trainable_stages, t.freeze_pattern, 0)
        stage = None
        if t.schedule == UnfreezeSchedule.GRADUAL:
            stage = 1 + (epoch - head_epochs - 1) // t.unfreeze_every
        return (t.freeze, t.bn_policy, t.trainable_stages, t.freeze_pattern, stage)

    return plan_for


# ---- 4. callbacks --------------------------------------------------------------------------------
def plan_callbacks(cfg: RunConfig, setup: Setup, optimizer: torch.optim.Optimizer, run: RunDirectory,
                   validation: Validation, deadline: float | None, progress: bool,
                   extra: dict[str, Any]) -> list[cb.Callback]:
    """The policies of the recipe around the loop (see :mod:`medtransfer.train.callbacks`). Without a
    validation split (a fit on train + val) the last epoch is kept and nothing stops on validation."""
    t = cfg.train
    has_val = "val" in setup.eval_loaders
    steps = -(-len(setup.train_loader) // t.grad_accum) * t.finetune_epochs
    nan = float("nan")
    callbacks: list[cb.Callback] = [
        cb.Unfreeze(unfreeze_plan(cfg), adaptation.plan_applier(t.adaptation)),
        cb.BestModel("val_auc", "max", tiebreak="val_loss") if has_val else cb.BestModel("epoch", "max"),
        cb.History(run, lambda r: f"train loss {r['train_loss']:.4f}, val loss {r.get('val_loss', nan):.4f}, "
                                  f"val AUC {r.get('val_auc', nan):.4f}"),
        cb.LastCheckpoint(run, extra),
        cb.ProgressBar(len(setup.train_loader), progress and setup.dist.main,
                       lambda r: f"val AUC {r.get('val_auc', nan):.3f}"),
    ]
    if t.lr_schedule in (LRSchedule.COSINE, LRSchedule.ONECYCLE):
        factor = cb.cosine_factor if t.lr_schedule == LRSchedule.COSINE else cb.onecycle_factor
        callbacks.append(cb.LRSchedule(factor, steps, phases=("finetune",)))
    if t.lr_schedule == LRSchedule.PLATEAU and has_val:
        mode = "min" if t.plateau_monitor == PlateauMonitor.VAL_LOSS else "max"
        callbacks.append(cb.Plateau(optimizer, t.plateau_monitor, mode, t.plateau_factor,
                                    t.plateau_patience, t.min_lr))
    if t.patience and has_val:
        callbacks.append(cb.EarlyStopping("val_auc", t.patience, "max", tiebreak="val_loss"))
    if deadline is not None:
        callbacks.append(cb.TimeLimit(deadline, validation.final_pass_estimate(REPORT_SECONDS)))
    if t.tensorboard and setup.dist.main:
        callbacks += _tensorboard(run)
    return callbacks


def _tensorboard(run: RunDirectory) -> list[cb.Callback]:
    try:
        return [cb.TensorBoard(str(run / "tensorboard"), ("train_loss", "val_loss", "val_auc", "lr"))]
    except ImportError:
        logger.warning("train.tensorboard is on but tensorboard is not installed (pip install tensorboard); "
                       "logging to history.csv only.")
        return []


def build_optimizer(model: TransferModel, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with one param group per backbone layer group (input → output, discriminative LRs, or
    layer-wise decay with ``train.layer_decay``; LoRA / BitFit: ``lr × adapter_lr_mult``) and the head
    last. Frozen parameters stay in their group: with no gradient they are not stepped, so unfreezing
    and resuming never rebuild or reorder the groups."""
    t = cfg.train
    groups = layer_groups(model.backbone)
    base = t.lr * t.backbone_lr_mult
    if t.adaptation in (AdaptationMode.LORA, AdaptationMode.BITFIT):
        lrs = [t.lr * t.adapter_lr_mult] * len(groups)
    elif t.layer_decay < 1.0:
        lrs = adaptation.layer_decay_rates(len(groups), base, t.layer_decay)
    else:
        lrs = group_learning_rates(len(groups), base, t.layer_lr_ratio)
    return torch.optim.AdamW(
        [{"params": g.params, "lr": lr, "name": g.name} for g, lr in zip(groups, lrs)]
        + [{"params": list(model.head.parameters()), "lr": cfg.train.lr, "name": "head"}],
        weight_decay=cfg.train.weight_decay,
    )


# ---- 5. one fit, start to finish -----------------------------------------------------------------
def fit_classifier(prep: Prepared, run: RunDirectory, *, progress: bool = False, deadline: float | None = None,
                   resume_state: dict[str, Any] | None = None, callbacks: tuple[cb.Callback, ...] = (),
                   device: torch.device | None = None, dist: Distributed = Distributed(),
                   shared_features: Path | None = None) -> FinetuneResult:
    """Build, train and report one classification model into ``run`` (see the module docstring).
    ``shared_features``: a feature cache kept across fits whose frozen backbone and training images are
    the same (an ensemble's members from one pretrained backbone): computed by the first, read by the others."""
    t_start = time.perf_counter()
    cfg = prep.cfg
    if cfg.train.adaptation == AdaptationMode.AUTO:
        raise ConfigError("train.adaptation = auto chooses among fits; run it through medtransfer.train.finetune "
                          "(medtransfer finetune), not one fit (or choose a mode for cross-validation folds).")
    gen = seed_everything(cfg.train.seed)
    setup = build(prep, device or pick_device(cfg.train.device), dist, gen)
    if cfg.train.adaptation == AdaptationMode.LORA:  # before the optimizer: the adapters are its parameters
        t = cfg.train
        adaptation.add_lora(setup.model.backbone, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_targets)
        setup.model.to(setup.device)
    run.write_json("split_report.json", prep.splits)
    run.write_json("load_report.json", setup.report.to_dict())
    validation = Validation(setup, prep, shared_features or run / ".feature_cache", progress and dist.main,
                            reuse=shared_features is not None)
    optimizer = build_optimizer(setup.model, cfg)
    extra = {"config": cfg.to_dict(), "data": prep.data, "labels": prep.labels, "auto_final_fit": bool(prep.selection)}
    trainer = Trainer(setup.model, optimizer, setup.loss_fn, device=setup.device, autocast=setup.autocast,
                      scaler=torch.amp.GradScaler("cuda", enabled=setup.amp_dtype is torch.float16),
                      grad_accum=cfg.train.grad_accum, dist=dist, generator=gen, samplers=setup.samplers,
                      callbacks=[*plan_callbacks(cfg, setup, optimizer, run, validation, deadline, progress, extra),
                                 *callbacks])
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
        logger.info("resuming %s after epoch %d", run.path, trainer.state.epoch)
    try:
        state = trainer.fit(plan_phases(cfg, setup, validation))
    finally:
        if shared_features is None:
            shutil.rmtree(validation.cache_dir, ignore_errors=True)
    best = next(c for c in trainer.callbacks if isinstance(c, cb.BestModel))
    record = adaptation_record(cfg, adaptation.parameter_counts(setup.model), state.history,
                               adaptation.merge_lora(setup.model), prep.selection)
    return finish(prep, setup, run, state, best.epoch, t_start, deadline, validation.feature_seconds, record)


def adaptation_record(cfg: RunConfig, counts: dict[str, Any], history: list[dict[str, Any]], merged: int,
                      selection: dict[str, Any] | None) -> dict[str, Any]:
    """``metrics.json["adaptation"]``: the mode, trainable / total parameters (of the last phase trained),
    seconds per epoch of each phase, LoRA's settings and merge, and ``auto``'s selection."""
    t = cfg.train
    seconds: dict[str, list[float]] = {}
    for row in history:
        seconds.setdefault(row["phase"], []).append(float(row["seconds"]))
    out: dict[str, Any] = {"mode": t.adaptation, "parameters": counts,
                           "seconds_per_epoch": {k: round(float(np.mean(v)), 3) for k, v in seconds.items()}}
    if t.adaptation == AdaptationMode.LORA:
        out["lora"] = {"rank": t.lora_rank, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                       "targets": list(t.lora_targets) or "default", "merged_layers": merged}
    if t.adaptation in (AdaptationMode.LORA, AdaptationMode.BITFIT):
        out["backbone_lr"] = t.lr * t.adapter_lr_mult
    if t.layer_decay < 1.0:
        out["layer_decay"] = t.layer_decay
    if selection is not None:
        out["selection"] = selection
    return out


def finish(prep: Prepared, setup: Setup, run: RunDirectory, state: Any, best_epoch: int, t_start: float,
           deadline: float | None, feature_seconds: float | None = None,
           record: dict[str, Any] | None = None) -> FinetuneResult:
    """The best model over the whole validation and test splits: report, ``model.pt``, ``metrics.json``."""
    t_eval = time.perf_counter()
    results = {name: labelled_results(loader.dataset.samples,
                                      predict_loader(setup.model, loader, setup.pre, setup.device, None,
                                                     setup.autocast)[0])
               for name, loader in setup.eval_loaders.items()}
    if prep.heldout_val is not None:  # a fit on train + val reports the out-of-fold predictions as val
        results["val"] = prep.heldout_val
    eval_s = time.perf_counter() - t_eval
    if not setup.dist.main:
        return FinetuneResult(run.path, {}, state.history, setup.report, prep.splits)
    info = model_info(prep, setup.spec, setup.wspec, setup.report, best_epoch, setup.dist.world, record)
    metrics = write_evaluation(run.path, results, prep.table.label_names, state.history, info,
                               prep.cfg.model.task == Task.ORDINAL)
    setup.model.cpu()
    payload = model_payload(setup.model, prep.cfg.to_dict(), setup.spec.to_dict(), prep.table.label_names,
                            prep.cfg.model.backbone, epoch=best_epoch, load_report=setup.report.to_dict(),
                            operating_point=metrics.get("operating_point"))
    run.save_model(payload)
    metrics.update(best_epoch=best_epoch, minutes=(time.perf_counter() - t_start) / 60, eval_seconds=eval_s,
                   compute=compute_info(setup.device, setup.amp_dtype, setup.channels_last, setup.dist.world),
                   split=prep.splits)
    if record is not None:
        metrics["adaptation"] = record
    if prep.skipped:
        metrics["skipped_images"] = prep.skipped
    if setup.head_fit is not None:
        metrics["head_solver"] = setup.head_fit
    if feature_seconds is not None:
        metrics["feature_cache_seconds"] = feature_seconds  # the frozen backbone's pass over train + val
    if deadline is not None:
        metrics["time_limit"] = {"epochs_run": len(state.history), "epochs_planned": state.epochs_planned,
                                 "stopped": state.stop_reason == "time limit"}
    run.write_metrics(metrics)
    finish_report(LoadedRun(setup.model.eval(), setup.pre, prep.table.label_names, prep.cfg, torch.device("cpu"),
                            payload, str(run.path)))
    return FinetuneResult(run.path, metrics, state.history, setup.report, prep.splits)


def _card_adaptation(record: dict[str, Any] | None) -> dict[str, Any]:
    """The adaptation lines of the model card's training section."""
    if not record:
        return {}
    p = record["parameters"]
    out = {"adaptation": record["mode"],
           "trainable parameters": f"{p['trainable']:,} of {p['total']:,} ({p['trainable_percent']:.3g}%)"}
    if "lora" in record:
        out["lora"] = f"rank {record['lora']['rank']}, alpha {record['lora']['alpha']:g}, merged into the weights"
    if "layer_decay" in record:
        out["layer_decay"] = record["layer_decay"]
    sel = record.get("selection")
    if sel:
        out["adaptation chosen by"] = sel["summary"]
    return out


def model_info(prep: Prepared, spec: PreprocessSpec, wspec: WeightSpec, report: LoadReport,
               best_epoch: int | None, world: int, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model card's description of a run (data, preprocessing, weights, training and adaptation)."""
    cfg = prep.cfg
    t = cfg.train
    return {
        "model_name": f"{cfg.model.backbone} fine-tuned ({cfg.modality})"
        + (f", ensemble of {t.ensemble}" if t.ensemble > 1 else ""),
        "modality": cfg.modality,
        "created": datetime.now().isoformat(timespec="seconds"),
        "medtransfer_version": __version__,
        "label_names": prep.table.label_names,
        "data": {
            "source": "built-in SYNTHETIC demo data (not patient data)" if prep.demo else str(prep.data),
            "splits": {k: {"n_patients": v["patients"], "n_images": v["images"]} for k, v in prep.splits.items()},
        },
        "preprocessing": spec.to_dict(),
        **({"volume_encoder": report.volume_encoder} if report.volume_encoder else {}),
        "weights": {"architecture": wspec.architecture, "name": report.weights, "source": report.source,
                    "licence": wspec.license if cfg.model.weights == "pretrained" else "n/a",
                    "sha256": report.sha256},
        "training": {"head_epochs": t.head_epochs, "finetune_epochs": t.finetune_epochs, "best_epoch": best_epoch,
                     "lr": t.lr, "backbone_lr_mult": t.backbone_lr_mult, "bn_policy": t.bn_policy,
                     "freeze": t.freeze, "schedule": t.schedule, "lr_schedule": t.lr_schedule,
                     "feature_cache": t.feature_cache, "world_size": world, "ensemble": t.ensemble,
                     **_card_adaptation(record)},
    }
