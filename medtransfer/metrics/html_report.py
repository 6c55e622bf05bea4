"""``report.html``: one self-contained page per run directory, built only from the files the run wrote.

It reads ``metrics.json``, ``history.csv``, ``config.yaml``, ``load_report.json``, ``split_report.json``,
``model_card.md``, ``plots/*.png`` and ``plots/saliency_gallery.json`` (whichever exist) and writes one
HTML file with every image embedded as a ``data:`` URI: no script, no stylesheet or font from the
network, readable on a laptop screen and printable (figures are not split across pages). A section
whose file is absent says so instead of disappearing.
"""
from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from medtransfer.metrics._utils import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "markdown_to_html", "render_html_report", "write_html_report"]

REPORT_FILE = "report.html"
GALLERY_PNG = "plots/saliency_gallery.png"
GALLERY_JSON = "plots/saliency_gallery.json"
_ABSENT = "not recorded in this run directory"
_COUNTS = ("patients", "images", "cases")

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0 auto;
max-width:1080px;padding:1.2rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.2rem 0 .3rem}h2{font-size:1.2rem;border-bottom:1px solid #ccd;margin-top:2rem}
h3{font-size:1.02rem;margin:1.1rem 0 .4rem}.meta{color:#555;font-size:.9rem}
table{border-collapse:collapse;margin:.4rem 0 .8rem;font-size:.9rem}
th,td{border:1px solid #ccd;padding:.25rem .55rem;text-align:left;vertical-align:top}th{background:#f1f2f6}
code{font-size:.85em;background:#f4f4f7;padding:0 .2em;border-radius:3px}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:1rem}
figure{margin:0;break-inside:avoid;page-break-inside:avoid}figure img{width:100%;height:auto;border:1px solid #e3e3ea}
figcaption{font-size:.85rem;color:#444}.wide{grid-column:1/-1}.wide img{max-width:900px}
table.kv td:first-child{font-weight:600;white-space:nowrap}.note{color:#666;font-style:italic}
.card{background:#fafafc;border:1px solid #e3e3ea;padding:.2rem 1rem;border-radius:4px}
@media print{body{max-width:none;padding:0;font-size:11pt}h2{break-after:avoid}
.figs{grid-template-columns:repeat(2,1fr)}table,tr{break-inside:avoid}}
"""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as exc:
        logger.warning("%s unreadable (%s); its section is left out", path, exc)
        return None


def _read_run(run_dir: Path) -> dict[str, Any]:
    """Everything the page shows, as plain data (missing files: None)."""
    import yaml

    cfg_path = run_dir / "config.yaml"
    history = None
    if (run_dir / "history.csv").is_file():
        with open(run_dir / "history.csv", newline="", encoding="utf-8") as fh:
            history = list(csv.DictReader(fh))
    card = run_dir / "model_card.md"
    metrics = _read_json(run_dir / "metrics.json") or {}
    return {
        "dir": run_dir,
        "metrics": metrics,
        "config": yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else None,
        "history": history,
        "load_report": _read_json(run_dir / "load_report.json"),
        "split_report": _read_json(run_dir / "split_report.json") or _case_split(run_dir / "split.csv"),
        "gallery": _read_json(run_dir / GALLERY_JSON),
        "card": card.read_text(encoding="utf-8") if card.is_file() else None,
        "plots": sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "plots").glob("*.png"))
        if (run_dir / "plots").is_dir() else [],
    }


def _case_split(path: Path) -> dict[str, Any] | None:
    """Cases per split from a segmentation run's ``split.csv`` (``case_id, split``)."""
    if not path.is_file():
        return None
    counts: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            counts[row["split"]] = counts.get(row["split"], 0) + 1
    return {k: {"cases": v} for k, v in counts.items()}


def _learning_curves_uri(history: list[dict[str, Any]]) -> str | None:
    """Learning curves drawn from history.csv for a run whose report wrote none (segmentation)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from medtransfer.metrics.plots import learning_curves_figure

    try:
        fig = learning_curves_figure(history)
    except ValueError:
        return None
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" if isinstance(v, float) else _e(v)


def _ci(v: Any, ci: Any) -> str:
    if v is None:
        return "undefined"
    if isinstance(ci, Sequence) and len(ci) == 2 and None not in ci:
        return f"{v:.3f} ({ci[0]:.3f}–{ci[1]:.3f})"
    return f"{v:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of label / value (values are HTML already)."""
    return "<table class='kv'><tbody>" + "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows) + \
        "</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(run: Mapping[str, Any], rel: str, caption: str, wide: bool = False) -> str:
    cls = ' class="wide"' if wide else ""
    return (f'<figure{cls}><img src="{_data_uri(run["dir"] / rel)}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _summary_section(run: Mapping[str, Any]) -> str:
    """Task, data, split sizes, backbone and weights, adaptation and the transfer plan."""
    m, cfg, lr = run["metrics"], run["config"] or {}, run["load_report"] or {}
    model, train, data = cfg.get("model") or {}, cfg.get("train") or {}, cfg.get("data") or {}
    split = run["split_report"] or m.get("split") or {}
    sizes = "; ".join(f"{k}: " + " / ".join(f"{v[c]} {c}" for c in _COUNTS if c in v)
                      for k, v in split.items() if isinstance(v, Mapping)) or _ABSENT
    adapted = "; ".join(f"<code>{_e(a.get('key'))}</code> {_e(a.get('from'))} → {_e(a.get('to'))} "
                        f"({_e(a.get('how', a.get('reason', '')))})" for a in lr.get("adapted") or []) or "none"
    rows = [
        ("task", _e(m.get("task", "—")) + (f" — classes: {_e(', '.join(map(str, m['label_names'])))}"
                                            if m.get("label_names") else "")),
        ("data", _e(data.get("path") or (cfg.get("data") or {}).get("source") or _data_source(run))),
        ("split", _e(sizes)),
        ("backbone", _e(model.get("backbone") or model.get("encoder") or "—")),
        ("weights", _e(lr.get("weights") or model.get("weights") or "—")
         + (f" (source: {_e(lr['source'])})" if lr.get("source") else "")),
        ("adaptation", adapted),
        ("transfer plan", _e(", ".join(f"{k}={train[k]}" for k in ("freeze", "bn_policy", "schedule", "lr_schedule",
                                                                  "head_epochs", "finetune_epochs", "epochs",
                                                                  "ensemble") if k in train) or "—")),
        ("input", _e(_input_text(cfg))),
    ]
    return "<h2>Summary</h2>" + _kv_table(rows)


def _data_source(run: Mapping[str, Any]) -> str:
    card = run["card"] or ""
    found = re.search(r"\*\*source\*\*: (.+)", card)
    return found.group(1).strip() if found else "—"


def _input_text(cfg: Mapping[str, Any]) -> str:
    data = cfg.get("data") or {}
    parts = [f"{k} {data[k]}" for k in ("size", "window", "spacing") if k in data]
    return ", ".join(parts) or "—"


def _classification_metrics(m: Mapping[str, Any]) -> str:
    rows = []
    for split in ("val", "test"):
        b = m.get(split)
        if isinstance(b, Mapping):
            rows.append((split, _num(b.get("n")), _num(b.get("n_patients")), _ci(b.get("auc"), b.get("auc_ci")),
                         _num(b.get("average_precision")), _num(b.get("ece"))))
    if not rows:
        return f"<p class='note'>No evaluated split ({_ABSENT}).</p>"
    info = ((m.get("test") or m.get("val") or {}).get("auc_ci_info")) or {}
    note = (f"<p class='meta'>95% confidence intervals: {_e(info.get('method', 'bootstrap'))}, "
            f"{_e(info.get('n_boot', '?'))} resamples of {_e(info.get('resampled', 'images'))}.</p>"
            if info else "")
    return _table(["split", "images", "patients", "AUC (95% CI)", "average precision", "ECE"], rows) + note


def _segmentation_metrics(m: Mapping[str, Any]) -> str:
    out = []
    for split in ("val", "test"):
        b = m.get(split)
        if not isinstance(b, Mapping) or "per_label" not in b:
            continue
        rows = []
        for name, block in b["per_label"].items():
            rows.append([_e(name)] + [_ci((block.get(k) or {}).get("mean"), [(block.get(k) or {}).get("ci_low"),
                                                                              (block.get(k) or {}).get("ci_high")])
                                      for k in ("dice", "hd95_mm", "nsd")])
        out.append(f"<h3>{_e(split)} ({_e(b.get('n_cases', '?'))} cases)</h3>"
                   + _table(["structure", "Dice (95% CI)", "HD95 mm (95% CI)", "NSD (95% CI)"], rows))
    return "".join(out) or f"<p class='note'>No scored split ({_ABSENT}).</p>"


def _operating_point_section(m: Mapping[str, Any]) -> str:
    op = m.get("operating_point")
    if not isinstance(op, Mapping):
        return ""
    thr = op.get("threshold")
    thr_txt = (f"{thr:.4g}" if isinstance(thr, float) else
               ", ".join(f"{k} {v:.3g}" for k, v in thr.items()) if isinstance(thr, Mapping) else "argmax")
    head = (f"<p>Method <b>{_e(op.get('method'))}</b>, threshold <b>{_e(thr_txt)}</b>, chosen on "
            f"{_e(op.get('chosen_on') or '—')}" + (f"; positive class <b>{_e(op['positive_label'])}</b>"
                                                  if op.get("positive_label") else "") + ".</p>")
    rows = []
    for split in ("val", "test"):
        s = op.get(split)
        if isinstance(s, Mapping) and "sensitivity" in s:
            rows.append((split, _ci(s.get("sensitivity"), s.get("sensitivity_ci")),
                         _ci(s.get("specificity"), s.get("specificity_ci")), _num(s.get("ppv")), _num(s.get("npv")),
                         _num(s.get("f1")), f"TP {s.get('tp')}, FP {s.get('fp')}, TN {s.get('tn')}, FN {s.get('fn')}"))
    table = _table(["split", "sensitivity", "specificity", "PPV", "NPV", "F1", "counts"], rows) if rows else ""
    return "<h2>Operating point</h2>" + head + table


_FIGURE_ORDER = (("roc_", "ROC curve"), ("pr_", "Precision–recall curve"), ("reliability_", "Reliability diagram"),
                 ("confusion_", "Confusion matrix"), ("learning_curves", "Learning curves"),
                 ("overlay_", "Segmentation overlay"))


def _figures_section(run: Mapping[str, Any]) -> str:
    """Every PNG under plots/ (the saliency gallery has its own section), in a fixed order."""
    plots = [p for p in run["plots"] if p != GALLERY_PNG]
    extra = ""
    if "plots/learning_curves.png" not in plots and run["history"]:
        uri = _learning_curves_uri(run["history"])
        caption = "Learning curves (from history.csv) — dashed lines: a training phase starts"
        extra = f'<figure><img src="{uri}" alt="{caption}"><figcaption>{caption}</figcaption></figure>' if uri else ""
    if not plots and not extra:
        return f"<h2>Figures</h2><p class='note'>No figures ({_ABSENT}).</p>"

    def rank(rel: str) -> tuple[int, str]:
        name = Path(rel).stem
        for i, (prefix, _) in enumerate(_FIGURE_ORDER):
            if name.startswith(prefix):
                return i, ("0" if name.endswith("_test") else "1") + name
        return len(_FIGURE_ORDER), name

    figs = []
    for rel in sorted(plots, key=rank):
        name = Path(rel).stem
        label = next((t for p, t in _FIGURE_ORDER if name.startswith(p)), name.replace("_", " "))
        split = name.rsplit("_", 1)[1] if name.rsplit("_", 1)[-1] in ("val", "test") else ""
        caption = f"{label} ({split})" if split else label
        if name == "learning_curves":
            caption += " — dashed lines: a training phase starts"
        figs.append(_figure(run, rel, caption, wide=name.startswith("overlay_")))
    return "<h2>Figures</h2><div class='figs'>" + "".join(figs) + extra + "</div>"


def _gallery_section(run: Mapping[str, Any]) -> str:
    if GALLERY_PNG not in run["plots"]:
        return ("<h2>Saliency gallery</h2><p class='note'>No saliency gallery (written by 'medtransfer evaluate' "
                "and 'finetune' for classification runs with a test split).</p>")
    g = run["gallery"] or {}
    rows = [(_e(it.get("group")), _e(Path(str(it.get("path", ""))).name), _num(it.get("probability")),
             _e(it.get("label")), _e(it.get("predicted"))) for it in g.get("items", [])]
    caption = (f"Most confident true positives, false positives and false negatives of the {g.get('split', 'test')} "
               f"split; {g.get('method', 'Grad-CAM')} on layer {g.get('layer') or '—'} (explained class: "
               f"{g.get('explained_class', 'the positive class')}).")
    return ("<h2>Saliency gallery</h2><div class='figs'>" + _figure(run, GALLERY_PNG, caption, wide=True) + "</div>"
            + (_table(["group", "image", "probability", "label", "predicted"], rows) if rows else ""))


def _load_report_section(run: Mapping[str, Any]) -> str:
    lr = run["load_report"]
    lines = (run["metrics"].get("training") or {}).get("load_report")  # segmentation runs: its summary lines
    if not lr and lines:
        return "<h2>Load report</h2><pre>" + _e("\n".join(map(str, lines))) + "</pre>"
    if not lr:
        return f"<h2>Load report</h2><p class='note'>{_ABSENT}.</p>"
    rows = [("weights", _e(lr.get("weights"))), ("source", _e(lr.get("source"))), ("file", _e(lr.get("file"))),
            ("sha256", f"<code>{_e(lr.get('sha256'))}</code>"),
            ("loaded as is", f"{len(lr.get('loaded') or [])} tensors")]
    for key in ("adapted", "reinitialised", "discarded", "unused"):
        items = lr.get(key) or []
        if items or key in ("adapted", "reinitialised"):
            rows.append((key, "<br>".join(_describe_tensor(i) for i in items) or "none"))
    return "<h2>Load report</h2>" + _kv_table(rows)


def _describe_tensor(item: Any) -> str:
    if not isinstance(item, Mapping):
        return f"<code>{_e(item)}</code>"
    rest = ", ".join(f"{k}: {v}" for k, v in item.items() if k != "key")
    return f"<code>{_e(item.get('key'))}</code> {_e(rest)}"


def _split_section(run: Mapping[str, Any]) -> str:
    sr = run["split_report"] or run["metrics"].get("split")
    if not isinstance(sr, Mapping) or not sr:
        return f"<h2>Split report</h2><p class='note'>{_ABSENT}.</p>"
    blocks = {k: v for k, v in sr.items() if isinstance(v, Mapping)}
    counts = [c for c in _COUNTS if any(c in v for v in blocks.values())]
    classes = sorted({c for v in blocks.values() for c in (v.get("per_class") or {})})
    rows = [[_e(k)] + [_num(v.get(c)) for c in counts] + [_num((v.get("per_class") or {}).get(c)) for c in classes]
            for k, v in blocks.items()]
    note = "Splits are grouped by patient." if "patients" in counts else "Splits are by case."
    return (f"<h2>Split report</h2><p class='meta'>{note}</p>"
            + _table(["split", *counts, *[f"class {c}" for c in classes]], rows))


def render_html_report(run_dir: str | os.PathLike) -> str:
    """The report page of ``run_dir`` as one HTML string (see the module docstring)."""
    run = _read_run(Path(run_dir))
    m = run["metrics"]
    title = (re.match(r"# Model card: (.+)", run["card"] or "") or [None, f"medtransfer run {Path(run_dir).name}"])[1]
    seg = m.get("task") == "segmentation"
    metrics_html = _segmentation_metrics(m) if seg else _classification_metrics(m)
    card = (f"<div class='card'>{markdown_to_html(run['card'])}</div>" if run["card"]
            else f"<p class='note'>{_ABSENT}.</p>")
    body = "".join([
        f"<h1>{_e(title)}</h1><p class='meta'>Run directory <code>{_e(Path(run_dir).resolve())}</code>; page "
        f"written {_e(datetime.now().isoformat(timespec='seconds'))} from the files in it.</p>",
        _summary_section(run), "<h2>Metrics</h2>", metrics_html, _operating_point_section(m),
        _figures_section(run), "" if seg else _gallery_section(run), _load_report_section(run),
        _split_section(run), "<h2>Model card</h2>", card,
    ])
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


def write_html_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for the run directory ``run_dir``; returns the path written."""
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    write_text_atomic(path, render_html_report(run_dir))
    logger.info("wrote %s", path)
    return path


# ------------------------------------------------------------------------------------------- Markdown
_INLINE = ((re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"), (re.compile(r"`(.+?)`"), r"<code>\1</code>"))


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _md_table(lines: list[str]) -> str:
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    body = [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    return ("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            + "</tbody></table>")


def markdown_to_html(text: str) -> str:
    """The Markdown subset of the model card (``#`` headings, ``-`` lists, pipe tables, paragraphs,
    ``**bold**`` and ``code``) as HTML; everything else is escaped text."""
    out: list[str] = []
    block: list[str] = []
    kind = ""

    def flush() -> None:
        nonlocal block, kind
        if block:
            if kind == "ul":
                out.append("<ul>" + "".join(f"<li>{_inline(b[2:])}</li>" for b in block) + "</ul>")
            elif kind == "table":
                out.append(_md_table(block))
            else:
                out.append(f"<p>{_inline(' '.join(block))}</p>")
        block, kind = [], ""

    for line in text.splitlines():
        heading = re.match(r"(#{1,6}) (.*)", line)
        new_kind = "ul" if line.startswith("- ") else "table" if line.startswith("|") else "p"
        if heading or not line.strip() or new_kind != kind:
            flush()
        if heading:
            level = min(len(heading.group(1)) + 2, 6)  # the card's '#' sits under the page's h2
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.strip():
            block.append(line)
            kind = new_kind
    flush()
    return "\n".join(out)
