"""Evaluate a trained run on any labelled set, and compare two runs on the same test set."""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from medtransfer.data.datasets import ImageSet, resolve_samples
from medtransfer.data.samples import SampleTable, split_by_patient
from medtransfer.errors import DataError
from medtransfer.evaluation import labelled_results, predict_loader
from medtransfer.metrics import delong_test, paired_bootstrap_auc_diff, write_classification_report
from medtransfer.run import LoadedRun, load_run
from medtransfer.run.report import finish_report
from medtransfer.utils.atomic import json_safe, write_json_atomic

logger = logging.getLogger(__name__)


def select_samples(run: LoadedRun, data: str | os.PathLike[str] | None, labels: str | os.PathLike[str] | None,
                   split: str | None) -> tuple[SampleTable, list]:
    """The labelled samples to evaluate.

    ``data=None`` re-creates the run's own split of the demo set (same seed and fractions) and takes
    its test split. A ``.npz`` defaults to its official test split. A folder + CSV takes every row,
    or only the rows of ``split`` when the CSV has a ``split`` column.
    """
    table = resolve_samples(data, labels)
    if data is None:
        split_by_patient(table, run.config.data.val_fraction, run.config.data.test_fraction, run.config.train.seed)
        split = split or "test"
    elif table.source == "npz":
        split = split or "test"
    if split and split != "all":
        samples = table.subset(split)
    else:
        samples = list(table.samples)
    if not samples:
        raise DataError(f"No labelled samples to evaluate (split '{split}').")
    return table, _align_classes(table, samples, run.label_names)


def _align_classes(table: SampleTable, samples: list, model_names: list[str]) -> list:
    """Samples whose labels index the model's classes.

    Numeric labels (CSV digits, ``.npz``) are class indices and must be below the model's class count;
    named labels are matched to the model's class names by name (the CSV's alphabetical order is not the
    model's order, and a set holding some of the classes is fine); a name the model does not know stops.
    """
    names = table.label_names
    if names == model_names:
        return samples
    if table.task == "multilabel" or all(n.isdigit() for n in names):
        if len(names) > len(model_names) or (table.task == "multilabel" and len(names) != len(model_names)):
            raise DataError(
                f"The data has {len(names)} classes (labels 0..{len(names) - 1}) but the model predicts "
                f"{len(model_names)}: {model_names}."
            )
        return samples
    unknown = [n for n in names if n not in model_names]
    if unknown:
        raise DataError(
            f"The data has classes {unknown} that the model does not predict; its classes are {model_names}. "
            f"Label the rows with these names, or with their indices 0..{len(model_names) - 1}."
        )
    to_model = {i: model_names.index(n) for i, n in enumerate(names)}
    logger.info("classes matched by name: %s", ", ".join(f"{n} -> {to_model[i]}" for i, n in enumerate(names)))
    return [dataclasses.replace(s, label=to_model[s.label]) for s in samples]


def predict_samples(run: LoadedRun, table: SampleTable, samples: list, batch_size: int = 32) -> dict[str, Any]:
    """Probabilities of ``run``'s model for labelled samples: the dict the metrics report takes."""
    loader = DataLoader(ImageSet(table, samples, run.pre, cache=False), batch_size=batch_size, shuffle=False)
    prob, logits = predict_loader(run.model, loader, run.pre, run.device)
    return {**labelled_results(samples, prob), "logits": logits}


def evaluate_run(run_dir: str | os.PathLike[str], data: str | os.PathLike[str] | None = None,
                 labels: str | os.PathLike[str] | None = None, split: str | None = None,
                 out_dir: str | os.PathLike[str] | None = None, device: str = "auto",
                 gallery: bool = True) -> dict[str, Any]:
    """Evaluate ``run_dir`` on a labelled set with the operating point chosen during training.

    Writes ``metrics.json`` (the evaluated set under ``test``), ``predictions_test.csv``, plots, a
    model card, the saliency gallery (binary runs, unless ``gallery=False``) and ``report.html`` into
    ``out_dir`` (default ``RUN_DIR/evaluation``). Returns the metrics.
    """
    run = load_run(run_dir, device)
    table, samples = select_samples(run, data, labels, split)
    result = predict_samples(run, table, samples)
    result.pop("logits")
    out = Path(out_dir) if out_dir else Path(run_dir) / "evaluation"
    task = "binary" if len(run.label_names) == 2 else "multiclass"
    threshold = run.threshold
    if task == "binary" and threshold is None:
        import warnings

        warnings.warn(f"{run_dir} records no operating point; using 0.5.", UserWarning, stacklevel=2)
        threshold = 0.5
    metrics = write_classification_report(
        out, val=None, test=result, label_names=run.label_names, task=task, threshold=threshold,
        ordinal=task == "multiclass" and run.config.model.task == "ordinal",
        extra_info={"model_name": f"{run.config.model.backbone} ({run.config.modality})",
                    "data": {"source": "built-in SYNTHETIC demo data" if data is None else str(data)}},
    )
    finish_report(run, out, gallery=gallery)
    return metrics


def _positive_column(names_a: list[str], names_b: list[str]) -> int:
    """Which probability column of run B is run A's positive class: matched by name (two runs trained on
    differently ordered labels), by index when either run has numeric class names."""
    if names_a == names_b or any(n.isdigit() for n in [*names_a, *names_b]):
        return 1
    if set(names_a) == set(names_b):
        return names_b.index(names_a[1])
    raise DataError(f"The runs predict different classes: A {names_a}, B {names_b}; compare needs the same two.")


def compare_runs(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str],
                 data: str | os.PathLike[str] | None = None, labels: str | os.PathLike[str] | None = None,
                 split: str | None = None, out: str | os.PathLike[str] | None = None,
                 n_boot: int = 2000, device: str = "auto") -> dict[str, Any]:
    """AUC difference of two binary runs on the same samples: DeLong's test and a paired bootstrap
    over patients. Writes the result as JSON to ``out`` when given."""
    ra, rb = load_run(run_a, device), load_run(run_b, device)
    if len(ra.label_names) != 2 or len(rb.label_names) != 2:
        raise DataError("compare needs two binary models (DeLong's test compares two AUCs).")
    col_b = _positive_column(ra.label_names, rb.label_names)
    table, samples = select_samples(ra, data, labels, split)
    pa = predict_samples(ra, table, samples)
    pb = predict_samples(rb, table, samples)
    y = pa["y"]
    dl = delong_test(y, pa["prob"][:, 1], pb["prob"][:, col_b])
    boot = paired_bootstrap_auc_diff(y, pa["prob"][:, 1], pb["prob"][:, col_b], groups=pa["patient_ids"],
                                     n_boot=n_boot)
    result = {
        "run_a": str(run_a), "run_b": str(run_b), "n": int(len(y)), "n_patients": len(set(pa["patient_ids"])),
        "delong": json_safe(dataclasses.asdict(dl)), "paired_bootstrap": json_safe(dataclasses.asdict(boot)),
    }
    if out:
        write_json_atomic(out, result)
    return result

