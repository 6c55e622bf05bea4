"""``train.ensemble = K``: K complete runs (seeds ``seed … seed+K-1``) on one split and one training
subset, each in ``RUN_DIR/members/<i>`` with its own report; the run directory holds the ensemble
(mean of the members' probabilities), evaluated and reported like a single model."""
from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from medtransfer.backbones import get_weight_spec
from medtransfer.config import RunConfig
from medtransfer.data.datasets import ImageSet
from medtransfer.data.samples import SampleTable
from medtransfer.errors import ConfigError
from medtransfer.evaluation import labelled_results, predict_loader, write_evaluation
from medtransfer.options import Task
from medtransfer.run import LoadedRun, RunDirectory, load_run
from medtransfer.run.checkpoint import model_payload
from medtransfer.run.report import finish_report
from medtransfer.train.classifier import REPORT_SECONDS, FinetuneResult, Prepared, fit_classifier, model_info
from medtransfer.train.classifier import prepare, resolve_auto
from medtransfer.transfer import EnsembleModel
from medtransfer.utils.distributed import Distributed

logger = logging.getLogger(__name__)


def finetune_ensemble(cfg: RunConfig, data: Any, labels: Any, run: RunDirectory, progress: bool,
                      samples: SampleTable | None, deadline: float | None, dist: Distributed) -> FinetuneResult:
    """Train the members, then evaluate and save their average (see the module docstring). Under a
    ``deadline`` a member starts only if one more member and the ensemble's evaluation (every member
    over val + test) fit, judged on the members trained so far."""
    t_start = time.perf_counter()
    if dist.world > 1:
        raise ConfigError("train.ensemble > 1 does not run under torchrun; train the members as separate "
                          "runs (train.seed=…) or set train.ensemble=1.")
    prep = prepare(cfg, data, labels, samples)  # once: every member trains on the same split and subset
    prep = replace(prep, cfg=resolve_auto(prep.cfg))
    run.write_config(prep.cfg.to_yaml())
    members = _train_members(prep, run, progress, deadline)
    return _evaluate_ensemble(prep, run, members, deadline, t_start)


def _member_deadline(members: list[FinetuneResult], i: int, deadline: float | None) -> float | None | bool:
    """The deadline member ``i`` trains under; False when it would not fit."""
    if deadline is None or not members:
        return deadline
    member_s = max(r.metrics["minutes"] * 60 for r in members)
    eval_s = max(r.metrics["eval_seconds"] for r in members)
    # The ensemble's own val + test pass runs every member: (i + 1) member evaluations.
    member_deadline = deadline - (i + 1) * eval_s - REPORT_SECONDS
    return False if time.perf_counter() + member_s > member_deadline else member_deadline


def _train_members(prep: Prepared, run: RunDirectory, progress: bool, deadline: float | None) -> list[FinetuneResult]:
    cfg, members = prep.cfg, []
    # The head epochs' features are the pretrained backbone's, on the same training images, for every
    # member: computed once (random initialisations differ by seed, so they are not shared).
    shared = run / ".feature_cache" if cfg.model.weights != "none" else None
    try:
        for i in range(cfg.train.ensemble):
            member_deadline = _member_deadline(members, i, deadline)
            if member_deadline is False:
                logger.warning("time limit: the ensemble stops at %d of %d members (train.time_limit_minutes)",
                               i, cfg.train.ensemble)
                break
            mcfg = copy.deepcopy(cfg)
            mcfg.train.ensemble, mcfg.train.seed = 1, cfg.train.seed + i
            logger.info("ensemble member %d/%d (seed %d)", i + 1, cfg.train.ensemble, mcfg.train.seed)
            member_run = RunDirectory(run / "members" / str(i)).open_new()
            member_run.write_config(mcfg.to_yaml())
            members.append(fit_classifier(replace(prep, cfg=mcfg), member_run, progress=progress,
                                          deadline=member_deadline, shared_features=shared))
    finally:  # also when a member fails: no cache is left in the run directory
        if shared is not None:
            shutil.rmtree(shared, ignore_errors=True)
    return members


def predict_splits(prep: Prepared, model: torch.nn.Module, pre: Any, device: torch.device) -> dict[str, Any]:
    """A saved model's labelled probabilities on the validation and test splits (those the table holds)."""
    results = {}
    for name in ("val", "test"):
        if prep.subset(name):
            loader = DataLoader(ImageSet(prep.table, prep.subset(name), pre, cache=False),
                                batch_size=prep.cfg.train.batch_size, shuffle=False,
                                num_workers=prep.cfg.data.num_workers)
            results[name] = labelled_results(prep.subset(name), predict_loader(model, loader, pre, device)[0])
    return results


def _evaluate_ensemble(prep: Prepared, run: RunDirectory, members: list[FinetuneResult], deadline: float | None,
                       t_start: float) -> FinetuneResult:
    cfg = prep.cfg
    loaded = [load_run(r.run_dir, cfg.train.device) for r in members]
    model = EnsembleModel([r.model for r in loaded])  # members come back in eval mode
    pre, device = loaded[0].pre, loaded[0].device
    results = predict_splits(prep, model, pre, device)
    history = [{"member": i, **row} for i, r in enumerate(members) for row in r.history]
    run.write_rows("history.csv", history)
    report = members[0].load_report
    info = model_info(prep, pre.spec, get_weight_spec(cfg.model.backbone), report, None, 1)
    metrics = write_evaluation(run.path, results, prep.table.label_names, None, info, cfg.model.task == Task.ORDINAL)
    model.cpu()
    payload = model_payload(model, cfg.to_dict(), pre.spec.to_dict(), prep.table.label_names, cfg.model.backbone,
                            epoch=None, load_report=report.to_dict(), operating_point=metrics.get("operating_point"))
    run.save_model(payload)
    metrics["members"] = [
        {"seed": cfg.train.seed + i, "best_epoch": r.metrics.get("best_epoch"), "val_auc": r.metrics["val"].get("auc"),
         "test_auc": (r.metrics.get("test") or {}).get("auc"), "run_dir": str(r.run_dir)}
        for i, r in enumerate(members)]
    if "adaptation" in members[0].metrics:  # each member's mode and parameters (the ensemble holds K of them)
        metrics["adaptation"] = {**members[0].metrics["adaptation"], "per_member": True, "members": len(members)}
    metrics.update(best_epoch=None, compute=members[0].metrics.get("compute"),
                   minutes=(time.perf_counter() - t_start) / 60, split=prep.splits)
    if deadline is not None:
        metrics["time_limit"] = {"members_trained": len(members), "members_planned": cfg.train.ensemble,
                                 "stopped": len(members) < cfg.train.ensemble
                                 or any(r.metrics["time_limit"]["stopped"] for r in members)}
    run.write_metrics(metrics)
    finish_report(LoadedRun(model, pre, prep.table.label_names, cfg, torch.device("cpu"), payload, str(run.path)))
    return FinetuneResult(run.path, metrics, history, report, prep.splits)
