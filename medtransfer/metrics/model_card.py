"""A model card (Markdown) built only from what a run recorded; anything missing reads "not recorded"."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medtransfer.metrics._utils import nan_to_none, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["render_model_card", "write_model_card"]

NOT_RECORDED = "not recorded"
# Below this many test patients (or images when patients are unknown), the card warns about CI width.
_SMALL_TEST = 100

_INTENDED_USE = (
    "Research use only. This model is **not a medical device**, has not been cleared or approved by any "
    "regulator, and must not be used to diagnose, treat or triage patients or to replace the judgement of a "
    "qualified clinician. Any clinical use needs local validation on data from the intended site and "
    "population, under the applicable regulations."
)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return NOT_RECORDED
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(value: Any, ci: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(ci, Sequence) and len(ci) == 2 and None not in ci:
        return f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
    return f"{value:.3f} (CI not recorded)"


def _kv_lines(obj: Any) -> list[str]:
    if obj is None or obj == {} or obj == []:
        return [NOT_RECORDED]
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, Mapping):
        return [f"- **{k}**: {_fmt(v) if not isinstance(v, (list, dict)) else v}" for k, v in obj.items()]
    return [f"- {item}" for item in obj]


def _split_rows(info: Mapping[str, Any]) -> list[str]:
    data = info.get("data") or {}
    splits = dict(data.get("splits") or {})
    metrics = info.get("metrics") or {}
    for name in ("train", "val", "test"):  # evaluated splits carry their own counts
        block = metrics.get(name)
        if isinstance(block, Mapping) and name not in splits:
            splits[name] = {"n_images": block.get("n"), "n_patients": block.get("n_patients")}
    if not splits:
        return [f"Split sizes: {NOT_RECORDED}."]
    rows = ["| split | patients | images |", "| --- | --- | --- |"]
    for name, s in splits.items():
        s = s or {}
        rows.append(f"| {name} | {_fmt(s.get('n_patients'))} | {_fmt(s.get('n_images', s.get('n')))} |")
    return rows


def _metrics_section(metrics: Mapping[str, Any]) -> list[str]:
    if not metrics:
        return [NOT_RECORDED]
    lines: list[str] = []
    split_blocks = {k: v for k, v in metrics.items() if k in ("train", "val", "test") and isinstance(v, Mapping)}
    if split_blocks:
        lines += ["| split | images | patients | AUC (95% CI) | average precision | ECE |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, b in split_blocks.items():
            lines.append(f"| {name} | {_fmt(b.get('n'))} | {_fmt(b.get('n_patients'))} | "
                         f"{_ci(b.get('auc'), b.get('auc_ci'))} | {_fmt(b.get('average_precision'))} | "
                         f"{_fmt(b.get('ece'))} |")
        test = split_blocks.get("test") or {}
        ci_info = test.get("auc_ci_info") or {}
        if ci_info.get("resampled"):
            lines.append("")
            lines.append(f"Confidence intervals: {ci_info.get('method', 'bootstrap')} with "
                         f"{ci_info.get('n_boot')} resamples of {ci_info['resampled']}.")
        per_class = test.get("per_class")
        if per_class:
            lines += ["", "Per-class test AUC:", "", "| class | AUC | average precision | positives |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {c} | {_fmt(v.get('auc'))} | {_fmt(v.get('average_precision'))} | "
                      f"{_fmt(v.get('n_positive'))} |" for c, v in per_class.items()]
    seg = {k: v for k, v in metrics.items() if k.startswith("mean_")}
    if seg:
        lines += [f"- **{k}**: {_fmt(v)}" for k, v in seg.items()]
    return lines or _kv_lines({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})


def _operating_point_section(op: Mapping[str, Any] | None) -> list[str]:
    if not op:
        return [NOT_RECORDED]
    lines = [f"- **method**: {_fmt(op.get('method'))}"
             + (f" (target {op['target']})" if op.get("target") is not None else ""),
             f"- **threshold**: {_fmt(op.get('threshold'), 4)} (positive if probability >= threshold), chosen on "
             f"{_fmt(op.get('chosen_on'))}"]
    if op.get("positive_label") is not None:
        lines.append(f"- **positive class**: {op['positive_label']} (sensitivity and PPV refer to it)")
    for split in ("val", "test"):
        m = op.get(split)
        if isinstance(m, Mapping) and "sensitivity" in m:
            lines.append(f"- **{split}**: sensitivity {_ci(m.get('sensitivity'), m.get('sensitivity_ci'))}, "
                         f"specificity {_ci(m.get('specificity'), m.get('specificity_ci'))}, "
                         f"PPV {_fmt(m.get('ppv'))}, NPV {_fmt(m.get('npv'))} "
                         f"(TP {m.get('tp')}, FP {m.get('fp')}, TN {m.get('tn')}, FN {m.get('fn')})")
    return lines


def _limitations(info: Mapping[str, Any]) -> list[str]:
    out = [str(x) for x in (info.get("limitations") or [])]
    metrics = info.get("metrics") or {}
    test = metrics.get("test") if isinstance(metrics, Mapping) else None
    if isinstance(metrics, Mapping) and "val" in metrics and not test:
        out.append("No held-out test set was evaluated; validation figures were also used to choose the model "
                   "and the operating point, so they are optimistic.")
    if isinstance(test, Mapping):
        if test.get("n_patients") is None:
            out.append("Patient identifiers were not recorded for the test set: images of one patient may be "
                       "correlated and the confidence intervals (resampling images) may be too narrow.")
        size = test.get("n_patients") or test.get("n")
        if size is not None and size < _SMALL_TEST:
            out.append(f"The test set is small ({size} {'patients' if test.get('n_patients') else 'images'}); "
                       "the confidence intervals above are correspondingly wide.")
    op = info.get("operating_point") or metrics.get("operating_point")
    if isinstance(op, Mapping) and op.get("threshold") is not None:
        out.append(f"The operating threshold was chosen on the {op.get('chosen_on', 'validation')} set; "
                   "sensitivity and specificity change with prevalence and case mix at a new site.")
    out.append("Performance was measured only on the data summarised above; it may not hold for other scanners, "
               "sites, populations or acquisition protocols.")
    return [f"- {x}" for x in out]


def render_model_card(info: Mapping[str, Any]) -> str:
    """The model card Markdown text for ``info`` (see :func:`write_model_card` for the keys)."""
    info = nan_to_none(dict(info))
    metrics = info.get("metrics") or {}
    weights = info.get("weights") or {}
    licence = weights.get("licence", weights.get("license"))
    calibration = info.get("calibration") or metrics.get("calibration")
    op = info.get("operating_point") or metrics.get("operating_point")
    data = info.get("data") or {}
    labels = info.get("label_names") or metrics.get("label_names") or []
    lines = [
        f"# Model card: {info.get('model_name') or 'medtransfer model'}",
        "",
        f"- **task**: {_fmt(info.get('task') or metrics.get('task'))}",
        f"- **labels**: {', '.join(map(str, labels)) or NOT_RECORDED}",
        f"- **modality**: {_fmt(info.get('modality'))}",
        f"- **created**: {_fmt(info.get('created'))}; medtransfer {_fmt(info.get('medtransfer_version'))}",
        "",
        "## Intended use",
        "",
        _INTENDED_USE,
    ]
    if info.get("intended_use"):
        lines += ["", str(info["intended_use"])]
    lines += ["", "## Data", "", f"- **source**: {_fmt(data.get('source'))}",
              f"- **licence**: {_fmt(data.get('licence', data.get('license')))}", ""]
    lines += _split_rows(info)
    lines += ["", "## Preprocessing", ""] + _kv_lines(info.get("preprocessing"))
    if info.get("volume_encoder"):
        lines += ["", "## Volume encoder", "", str(info["volume_encoder"])]
    lines += ["", "## Weights", ""]
    lines += [f"- **architecture**: {_fmt(weights.get('architecture'))}",
              f"- **pretrained weights**: {_fmt(weights.get('name'))} (source: {_fmt(weights.get('source'))})",
              f"- **licence**: {_fmt(licence)}",
              f"- **sha256**: {_fmt(weights.get('sha256'))}"]
    lines += ["", "## Training", ""] + _kv_lines(info.get("training"))
    if info.get("recipe_selection"):
        lines += ["", "## How the recipe was chosen", "", str(info["recipe_selection"])]
    lines += ["", "## Metrics", ""] + _metrics_section(metrics)
    lines += ["", "## Operating point", ""] + _operating_point_section(op)
    lines += ["", "## Calibration", ""] + _kv_lines(calibration)
    lines += ["", "## Known limitations", ""] + _limitations(info)
    return "\n".join(lines) + "\n"


def write_model_card(path: str | os.PathLike, *, info: Mapping[str, Any]) -> Path:
    """Write ``model_card.md`` (``path`` is the file, or a directory to write it into); returns the file path.

    Every section is derived from ``info``; a missing entry reads "not recorded". Keys used:
    ``model_name, task, label_names, modality, created, medtransfer_version, intended_use`` (extra text; the
    research-use / not-a-medical-device statement is always present), ``data`` =
    ``{source, licence, splits: {split: {n_patients, n_images}}}``, ``preprocessing`` (str, list or dict), ``volume_encoder`` (how volumes reach a 2D backbone),
    ``weights`` = ``{architecture, name, source, licence, sha256}``, ``training`` (dict), ``recipe_selection``
    (str: which of the data recipe's candidates was kept, and why), ``metrics`` (the dict
    returned by :func:`medtransfer.metrics.report.write_classification_report` or a segmentation summary),
    ``operating_point`` and ``calibration`` (taken from ``metrics`` when absent), ``limitations`` (list of str,
    listed before the limitations derived from the metrics).
    """
    path = Path(path)
    if path.suffix.lower() != ".md":
        path = path / "model_card.md"
    write_text_atomic(path, render_model_card(info))
    logger.info("wrote %s", path)
    return path
