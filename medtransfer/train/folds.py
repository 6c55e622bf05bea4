"""K-fold cross-validation grouped by patient and stratified by label.

The test split is held out first (the user's ``split`` column, the official MedMNIST test set, or
``data.test_fraction`` of the patients); the remaining patients are dealt into ``k`` folds with
scikit-learn's ``StratifiedGroupKFold`` (stratum: a patient's most frequent label). Fold ``i``
validates on fold ``i`` and trains on the others; every fold is a full run in ``OUT/fold<i>``.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.config import RunConfig
from medtransfer.data.datasets import resolve_samples
from medtransfer.data.samples import Sample, SampleTable, check_leakage, split_by_patient
from medtransfer.errors import DataError
from medtransfer.run import RunDirectory, default_run_dir
from medtransfer.train.classifier import fit_classifier, prepare, resolve_auto


def patient_folds(samples: list[Sample], k: int, seed: int = 0) -> dict[str, int]:
    """Fold index of every patient: grouped by patient, stratified by each patient's majority label."""
    from sklearn.model_selection import StratifiedGroupKFold

    by_patient: dict[str, list[int]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient_id].append(s.label)
    pids = sorted(by_patient)
    if len(pids) < k:
        raise DataError(f"--folds {k} needs at least {k} patients outside the test split; there are {len(pids)}.")
    strata = [max(Counter(by_patient[p]).items(), key=lambda kv: (kv[1], kv[0]))[0] for p in pids]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds: dict[str, int] = {}
    for i, (_, val_idx) in enumerate(splitter.split(np.zeros(len(pids)), strata, groups=pids)):
        for j in val_idx:
            folds[pids[j]] = i
    return folds


def fold_table(table: SampleTable, folds: dict[str, int], fold: int) -> SampleTable:
    """A copy of ``table`` where fold ``fold`` is ``val``, the other folds ``train``, ``test`` unchanged."""
    samples = [
        dataclasses.replace(s, split=s.split if s.split == "test" else ("val" if folds[s.patient_id] == fold else "train"))
        for s in table.samples
    ]
    arrays: dict[str, np.ndarray] = {}
    if table.source == "npz":  # images are looked up by (split, index): regroup them per new split
        for split in ("train", "val", "test"):
            pairs = [(i, old) for i, (old, new) in enumerate(zip(table.samples, samples)) if new.split == split]
            if pairs:
                arrays[split] = np.stack([table.arrays[old.split][old.index] for _, old in pairs])
            for j, (i, _) in enumerate(pairs):
                samples[i].index = j
    check_leakage(samples)
    return SampleTable(samples, list(table.label_names), table.source, arrays)


@dataclass
class FoldsResult:
    out_dir: Path
    summary: dict[str, Any]


def finetune_folds(
    cfg: RunConfig,
    k: int,
    data: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> FoldsResult:
    """Run ``k`` folds and write ``folds.json``: per-fold val/test AUC and their mean ± sd (ddof = 1)."""
    if k < 2:
        raise DataError(f"--folds must be at least 2, got {k}.")
    out = RunDirectory(out_dir or default_run_dir(cfg.modality)).open_new(overwrite)
    table = resolve_samples(data, labels, cfg.data.classes, cfg.data.outside_paths)
    if any(s.split is None for s in table.samples):
        split_by_patient(table, 0.0, cfg.data.test_fraction, cfg.train.seed)
    check_leakage(table.samples)
    folds = patient_folds([s for s in table.samples if s.split != "test"], k, cfg.train.seed)
    per_fold = [_fit_fold(cfg, data, labels, fold_table(table, folds, i), out / f"fold{i}", progress, i)
                for i in range(k)]
    summary: dict[str, Any] = {"k": k, "folds": per_fold}
    for key in ("val_auc", "test_auc"):
        vals = np.array([f[key] for f in per_fold if f[key] is not None], dtype=float)
        if len(vals):
            summary[key] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    out.write_json("folds.json", summary)
    return FoldsResult(out.path, summary)


def _fit_fold(cfg: RunConfig, data: Any, labels: Any, table: SampleTable, path: Path, progress: bool,
              i: int) -> dict[str, Any]:
    prep = prepare(cfg, data, labels, table)
    prep = dataclasses.replace(prep, cfg=resolve_auto(prep.cfg))
    run = RunDirectory(path).open_new()
    run.write_config(prep.cfg.to_yaml())
    res = fit_classifier(prep, run, progress=progress)
    return {"fold": i, "val_auc": res.metrics["val"]["auc"], "test_auc": res.metrics.get("test", {}).get("auc"),
            "best_epoch": res.metrics["best_epoch"], "run_dir": str(res.run_dir)}
