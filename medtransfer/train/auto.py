"""``train.adaptation = auto``: train every candidate mode, keep the best on held-out data, test once.

Two selection protocols (``train.auto_protocol``; ``auto`` picks by the size of the validation split):

* ``validation`` — each candidate is a full fit on the training split (``RUN_DIR/candidates/<mode>``,
  the test split left out of it), scored by its validation AUC with a patient-bootstrap 95% CI; the
  chosen mode is then trained again into ``RUN_DIR`` with the test split, which only that fit evaluates.
* ``cv`` — when the validation split is too small to rank candidates (its smallest class has fewer
  than ``train.auto_min_val_per_class`` images), each candidate is fitted on ``train.auto_folds``
  patient-grouped, label-stratified folds of train + val (``RUN_DIR/candidates/<mode>/fold<i>``) and
  scored by the AUC of its pooled out-of-fold predictions (bootstrap CI over patients). The chosen mode
  is trained on all of train + val for the median of its folds' best epochs (no validation split is
  left to pick an epoch; the last one is kept); its ``val`` metrics and operating point are the
  out-of-fold predictions, and the test split is evaluated once, by that final fit.

The winner has the highest AUC; ties go to the candidate with fewer trainable parameters. Every
candidate's score, the protocol and why it ran, and the reason for the choice go to ``metrics.json``
(``adaptation.selection``) and the model card. Under a time limit every fit gets an equal share of
what is left, the final fit included. Candidate folders keep their reports; their ``last.pt`` is
removed when they finish, and a cross-validation fold's ``model.pt`` once its out-of-fold
predictions are taken.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from medtransfer.config import RunConfig
from medtransfer.data.datasets import ImageSet
from medtransfer.data.samples import SampleTable, split_report
from medtransfer.errors import ConfigError
from medtransfer.evaluation import labelled_results, predict_loader
from medtransfer.evaluation.report import report_task
from medtransfer.metrics.classification import evaluate_classification
from medtransfer.options import SelectionProtocol
from medtransfer.run import RunDirectory, load_run
from medtransfer.train.classifier import FinetuneResult, Prepared, fit_classifier, prepare, resolve_auto
from medtransfer.train.folds import fold_table, patient_folds
from medtransfer.utils.distributed import Distributed

logger = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One adaptation mode's held-out result."""

    mode: str
    auc: float
    auc_ci: list[float | None]
    n_images: int
    n_patients: int | None
    parameters: dict[str, Any]
    minutes: float
    best_epochs: list[int] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smallest_class(prep: Prepared, split: str = "val") -> int:
    """Images of the rarest class in ``split`` (for 0/1 label vectors: the rarest of any label's two values)."""
    labels = [s.label for s in prep.subset(split)]
    if labels and isinstance(labels[0], tuple):
        y = np.array(labels)
        return int(min(np.minimum(y.sum(0), len(y) - y.sum(0)).min(), len(y)))
    counts = Counter(labels)
    return min(counts.get(k, 0) for k in range(prep.table.num_classes))


def selection_protocol(prep: Prepared) -> tuple[str, str]:
    """``(protocol, why)`` for this run (see the module docstring)."""
    t = prep.cfg.train
    if t.auto_protocol != SelectionProtocol.AUTO:
        return t.auto_protocol, f"train.auto_protocol = {t.auto_protocol}"
    n = smallest_class(prep)
    if n < t.auto_min_val_per_class:
        return SelectionProtocol.CV.value, (
            f"the validation split's smallest class has {n} images (< train.auto_min_val_per_class = "
            f"{t.auto_min_val_per_class}): its AUC is too uncertain to rank the candidates, so they are compared "
            f"by {t.auto_folds}-fold patient-grouped cross-validation over train + val")
    return SelectionProtocol.VALIDATION.value, (
        f"the validation split's smallest class has {n} images (>= train.auto_min_val_per_class = "
        f"{t.auto_min_val_per_class})")


def _with_mode(cfg: RunConfig, mode: str, **train: Any) -> RunConfig:
    out = copy.deepcopy(cfg)
    out.train.adaptation = mode
    for key, value in train.items():
        setattr(out.train, key, value)
    return resolve_auto(out)


def _table(table: SampleTable, samples: list[Any]) -> SampleTable:
    return SampleTable(samples, list(table.label_names), table.source, table.arrays, table.task)


def without_test(table: SampleTable) -> SampleTable:
    """``table`` less its test split (for fits that choose among candidates)."""
    return _table(table, [s for s in table.samples if s.split != "test"])


def _without_test(prep: Prepared) -> Prepared:
    table = without_test(prep.table)
    return replace(prep, table=table, splits=split_report(table))


class _Budget:
    """Equal shares of the time left among the fits still to run."""

    def __init__(self, deadline: float | None, fits: int):
        self.deadline, self.left = deadline, fits

    def next(self) -> float | None:
        if self.deadline is None:
            return None
        share = (self.deadline - time.perf_counter()) / max(self.left, 1)
        self.left -= 1
        return time.perf_counter() + share


def _fit(prep: Prepared, path: Any, budget: _Budget, progress: bool) -> FinetuneResult:
    """One candidate fit; its ``last.pt`` is removed once it has finished (a candidate is never resumed)."""
    run = RunDirectory(path).open_new()
    run.write_config(prep.cfg.to_yaml())
    res = fit_classifier(prep, run, progress=progress, deadline=budget.next())
    (run / "last.pt").unlink(missing_ok=True)
    return res


def validation_candidates(prep: Prepared, cfg: RunConfig, run: RunDirectory, budget: _Budget,
                          progress: bool) -> list[Candidate]:
    """Each mode fitted on train, scored on val (the test split is not part of these fits)."""
    out = []
    for mode in cfg.train.auto_candidates:
        res = _fit(replace(_without_test(prep), cfg=_with_mode(cfg, mode)), run / "candidates" / mode, budget, progress)
        val = res.metrics["val"]
        out.append(Candidate(mode, _num(val["auc"]), list(val.get("auc_ci") or [None, None]), val["n"],
                             val.get("n_patients"), res.metrics["adaptation"]["parameters"], res.metrics["minutes"],
                             [res.metrics["best_epoch"]], [str(res.run_dir)]))
    return out


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _predict_split(run_dir: Any, table: SampleTable, samples: list[Any], batch_size: int) -> dict[str, Any]:
    """A finished fit's probabilities for ``samples`` (its model.pt, as ``predict`` would load it)."""
    loaded = load_run(run_dir, "cpu")
    loader = DataLoader(ImageSet(table, samples, loaded.pre, cache=False), batch_size=batch_size, shuffle=False)
    return labelled_results(samples, predict_loader(loaded.model, loader, loaded.pre, loaded.device)[0])


def _pool(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"y": np.concatenate([p["y"] for p in parts]), "prob": np.concatenate([p["prob"] for p in parts]),
            "patient_ids": [i for p in parts for i in p["patient_ids"]], "paths": [i for p in parts for i in p["paths"]]}


def cv_candidates(prep: Prepared, cfg: RunConfig, run: RunDirectory, budget: _Budget,
                  progress: bool) -> tuple[list[Candidate], dict[str, dict[str, Any]]]:
    """Each mode fitted on ``auto_folds`` folds of train + val; returns the candidates and each mode's
    pooled out-of-fold predictions."""
    base = _without_test(prep)
    k = cfg.train.auto_folds
    folds = patient_folds(base.table.samples, k, cfg.train.seed)
    tables = [fold_table(base.table, folds, i) for i in range(k)]
    out, oof = [], {}
    for mode in cfg.train.auto_candidates:
        parts, fits = [], []
        for i, table in enumerate(tables):
            fold = replace(base, table=table, splits=split_report(table), cfg=_with_mode(cfg, mode))
            res = _fit(fold, run / "candidates" / mode / f"fold{i}", budget, progress)
            parts.append(_predict_split(res.run_dir, table, table.subset("val"), cfg.train.batch_size))
            (res.run_dir / "model.pt").unlink()  # its predictions are kept; k x candidates models would fill a disk
            fits.append(res)
        pooled = oof[mode] = _pool(parts)
        scores = evaluate_classification(pooled["y"], pooled["prob"], task=report_task({"val": pooled},
                                         prep.table.label_names), label_names=prep.table.label_names,
                                         patient_ids=pooled["patient_ids"], seed=cfg.train.seed)
        out.append(Candidate(mode, _num(scores["auc"]["value"]), [scores["auc"].get("ci_low"), scores["auc"].get("ci_high")],
                             scores["n"], scores.get("n_patients"), fits[0].metrics["adaptation"]["parameters"],
                             sum(f.metrics["minutes"] for f in fits), [f.metrics["best_epoch"] for f in fits],
                             [str(f.run_dir) for f in fits]))
    return out, oof


def choose(candidates: list[Candidate], protocol: str) -> tuple[Candidate, str]:
    """The highest AUC (ties: fewer trainable parameters) and the reason, with the runner-up."""
    ranked = sorted(candidates, key=lambda c: (-(c.auc if not math.isnan(c.auc) else -1.0),
                                               c.parameters["trainable"]))
    best = ranked[0]
    what = "validation AUC" if protocol == SelectionProtocol.VALIDATION else "cross-validated (out-of-fold) AUC"
    reason = f"{best.mode} has the highest {what}, {_auc_text(best)}"
    if len(ranked) > 1:
        second = ranked[1]
        overlap = (None not in best.auc_ci and None not in second.auc_ci
                   and second.auc_ci[1] >= best.auc_ci[0])  # type: ignore[operator]
        reason += f"; next {second.mode}, {_auc_text(second)}"
        if overlap:
            reason += " (the intervals overlap: the ranking is uncertain)"
    return best, reason


def _auc_text(c: Candidate) -> str:
    ci = "" if None in c.auc_ci else f" (95% CI {c.auc_ci[0]:.3f}-{c.auc_ci[1]:.3f})"
    return f"{c.auc:.3f}{ci}"


def _refit_prep(prep: Prepared, cfg: RunConfig, chosen: Candidate, oof: dict[str, Any]) -> Prepared:
    """train + val as one training split, for the median of the chosen mode's best epochs."""
    table = fold_table(prep.table, {s.patient_id: 0 for s in prep.table.samples if s.split != "test"}, -1)
    epochs = max(1, int(round(statistics.median(chosen.best_epochs))))
    mcfg = _with_mode(cfg, chosen.mode)
    head = min(epochs, mcfg.train.head_epochs if chosen.mode != "linear_probe" else epochs)
    mcfg.train.head_epochs, mcfg.train.finetune_epochs = head, epochs - head
    mcfg.train.patience = 0
    return replace(prep, cfg=mcfg, table=table, splits=split_report(table), heldout_val=oof)


def finetune_auto(cfg: RunConfig, data: Any, labels: Any, run: RunDirectory, progress: bool,
                  samples: SampleTable | None, deadline: float | None, dist: Distributed) -> FinetuneResult:
    """Train the candidates, choose one, train it for the record and test it once (see the module docstring)."""
    if dist.world > 1:
        raise ConfigError("train.adaptation = auto does not run under torchrun; choose a mode for a distributed run.")
    prep = prepare(cfg, data, labels, samples)
    run.write_config(resolve_auto(prep.cfg).to_yaml())
    protocol, why = selection_protocol(prep)
    n_fits = len(cfg.train.auto_candidates) * (cfg.train.auto_folds if protocol == SelectionProtocol.CV else 1) + 1
    budget = _Budget(deadline, n_fits)
    logger.info("adaptation auto: %s protocol (%s); candidates %s", protocol, why, cfg.train.auto_candidates)
    oof: dict[str, Any] = {}
    if protocol == SelectionProtocol.CV:
        candidates, oof = cv_candidates(prep, prep.cfg, run, budget, progress)
    else:
        candidates = validation_candidates(prep, prep.cfg, run, budget, progress)
    chosen, reason = choose(candidates, protocol)
    logger.info("adaptation auto chose %s: %s", chosen.mode, reason)
    final = (_refit_prep(prep, prep.cfg, chosen, oof[chosen.mode]) if protocol == SelectionProtocol.CV
             else replace(prep, cfg=_with_mode(prep.cfg, chosen.mode)))
    trained_on = "train + val (out-of-fold predictions reported as val)" if protocol == SelectionProtocol.CV \
        else "train (validation split for the best epoch and the operating point)"
    selection = {"protocol": protocol, "why": why, "candidates": [c.to_dict() for c in candidates],
                 "chosen": chosen.mode, "reason": reason, "final_fit_trained_on": trained_on,
                 "test_split": "evaluated once, by the final fit; no candidate saw it",
                 "summary": f"auto ({protocol}): {reason}"}
    return _fit_final(replace(final, selection=selection), run, progress, budget)


def _fit_final(prep: Prepared, run: RunDirectory, progress: bool, budget: _Budget) -> FinetuneResult:
    return fit_classifier(prep, run, progress=progress, deadline=budget.next())
