"""The ``medtransfer`` command line. Thin: it parses options and calls plain library functions.

Exit codes: 0 success; 1 the job failed (message says why); 2 bad usage or configuration.
"""
from __future__ import annotations

import json
import logging
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from medtransfer.cli import pacs_cmd as pacs
from medtransfer.cli._console import console
from medtransfer.cli._errors import ErrorHandlingGroup
from medtransfer.config import available_presets
from medtransfer.errors import ConfigError, DataError, UsageError

app = typer.Typer(
    cls=ErrorHandlingGroup,
    name="medtransfer",
    help=(
        "Transfer learning for medical imaging: adapt a pretrained backbone to DICOM / NIfTI / MedMNIST data, "
        "fine-tune it, report clinical metrics, and predict over DICOM folders.\n\n"
        "Start here: 'medtransfer finetune --modality xray' trains on built-in SYNTHETIC demo data, offline."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Modality = Enum("Modality", {name: name for name in available_presets()}, type=str)  # type: ignore[misc]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


def _setup_logging(quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    root = logging.getLogger("medtransfer")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _native_volume_backbone(config: Path | None, overrides: list[str]) -> str | None:
    """The backbone asked for when it is a native 3D encoder (the data recipe then plans its frozen probe)."""
    from medtransfer.train.choice import native_volume_backbone

    return native_volume_backbone(config, overrides)


def _recipe_configs(data: Path, config: Path | None, overrides: list[str], fitted_beside: bool) -> dict:
    """The configs of the data recipe's candidates for a ``.npz`` (the recipe's own last), printed with the
    profile and the recipe's reasons. ``fitted_beside``: False under --folds / --resume, which run one recipe."""
    from medtransfer.train.choice import recipe_candidates

    cfgs, profile, plans = recipe_candidates(data, config, overrides, fitted_beside)
    console.print(f"Data profile: {profile.dims}D, {profile.channels} channel(s), {profile.task} ({profile.n_classes} "
                  f"classes), {profile.n_train} training images -> 'general' preset"
                  + ("" if len(cfgs) == 1 else f"; {len(cfgs)} candidate recipes, the best on validation is kept"))
    for name, cfg in cfgs.items():
        plan = plans[name]
        console.print(("  " if len(cfgs) == 1 else f"  {name}: ") + _recipe_text(cfg, profile)
                      + f" (recipe estimate on a 2-core CPU: {plan.estimated_minutes:.0f} min"
                      + (f", stops by {cfg.train.time_limit_minutes:g} min" if cfg.train.time_limit_minutes else "") + ")")
        for reason in plan.reasons:
            console.print(f"    recipe: {reason}")
    return cfgs


def _recipe_text(cfg, profile) -> str:
    return (f"{cfg.model.backbone}, {cfg.data.size} px, {cfg.train.finetune_epochs} fine-tuning epochs"
            + (f", {cfg.data.train_fraction:.0%} of the training set" if cfg.data.train_fraction < 1 else "")
            + (f", model selection on {cfg.data.val_max:,} of {profile.n_val:,} validation images"
               if 0 < cfg.data.val_max < profile.n_val else "")
            + (f", ensemble of {cfg.train.ensemble}" if cfg.train.ensemble > 1 else ""))


def _fail(exc: Exception, code: int) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


@app.command()
def finetune(
    modality: Optional[Modality] = typer.Option(
        None, "--modality", "-m",
        help="Modality preset: preprocessing, windows, augmentation, backbone, recipe. Default: xray; for a .npz "
        "the 'general' preset with a recipe chosen from the data (2D gray/colour or 3D, task, size, CPU budget; "
        "single-channel volumes: the 2D recipe and, with medtransfer[ct], a frozen 3D CT encoder's probe, "
        "the better on validation kept).",
    ),
    data: Optional[Path] = typer.Option(
        None, "--data", "-d",
        help="A folder of DICOM files (with --labels), or a MedMNIST .npz file (official splits). "
        "Omitted: the built-in SYNTHETIC chest-radiograph demo set (generated once into the cache).",
    ),
    labels: Optional[Path] = typer.Option(
        None, "--labels", "-l",
        help="CSV with columns path,label[,patient_id][,split]; paths relative to --data or absolute. "
        "Without patient_id the DICOM PatientID is used; splits are always grouped by patient.",
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<timestamp>-<modality>)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file overriding the preset (same sections: data, augment, model, train)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override, repeatable: --set train.finetune_epochs=3 --set data.size=96."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="'pretrained' (default), 'none' (random initialisation) or a weights file."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Backbone from 'medtransfer backbones' (e.g. efficientnet_lite0.in1k)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and the final summary."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in RUN_DIR from its last.pt (its own config and data)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out (otherwise a folder that holds files is refused)."),
    folds: Optional[int] = typer.Option(None, "--folds", min=2, help="K-fold cross-validation grouped by patient: OUT/fold<i> runs and OUT/folds.json (mean ± sd)."),
) -> None:
    """Fine-tune a pretrained backbone and evaluate it on a patient-grouped test split.

    The recipe: read images in physical units (rescale slope/intercept, MONOCHROME1, VOI window),
    adapt the backbone's first conv to the input channels, train a new head on the frozen backbone,
    then unfreeze it at a lower learning rate; keep the epoch with the best validation AUC.

    The run directory holds model.pt (self-describing), config.yaml, metrics.json, history.csv,
    predictions_*.csv, split_report.json and load_report.json.

    Examples:

      medtransfer finetune --modality xray                      # synthetic demo data, offline

      medtransfer finetune --data breastmnist.npz --out runs/breast

      medtransfer finetune --data dicoms/ --labels labels.csv --set train.finetune_epochs=10
    """
    from medtransfer.config import load_config

    _setup_logging(quiet)
    overrides = list(set_)
    if weights is not None:
        overrides.append(f"model.weights={weights}")
    if backbone is not None:
        overrides.append(f"model.backbone={backbone}")
    try:
        if modality is None and data is not None and data.suffix == ".npz":
            candidates = _recipe_configs(data, config, overrides, fitted_beside=folds is None and resume is None)
            cfg = list(candidates.values())[-1]
        else:
            cfg = load_config(modality.value if modality is not None else "xray", config, overrides)
            candidates = {"recipe": cfg}
        from medtransfer.backbones import get_weight_spec
        from medtransfer.config import check_weights_file

        get_weight_spec(cfg.model.backbone)
        check_weights_file(cfg.model.weights)
    except (ConfigError, DataError) as exc:
        raise _fail(exc, 2) from None
    if data is None:
        console.print("Using the built-in [bold]SYNTHETIC[/] demo data (not patient data).")
    if folds is not None:
        typer.echo(str(_run_folds(cfg, folds, data, labels, out, quiet, overwrite)))
        return
    if len(candidates) > 1:
        from medtransfer.train.choice import finetune_best

        result = finetune_best(candidates, data, out_dir=out, progress=not quiet, overwrite=overwrite)
    else:
        from medtransfer.train.finetune import finetune as run_finetune

        result = run_finetune(cfg, data=data, labels=labels, out_dir=out, progress=not quiet, resume=resume,
                              overwrite=overwrite)
    _print_run_summary(result.metrics)
    typer.echo(str(result.run_dir))


def _run_folds(cfg, folds: int, data: Path | None, labels: Path | None, out: Path | None, quiet: bool,
               overwrite: bool) -> Path:
    """``--folds K``: the K patient-grouped folds, each fold's AUCs and their mean ± sd printed."""
    from medtransfer.train.folds import finetune_folds

    cv = finetune_folds(cfg, folds, data=data, labels=labels, out_dir=out, progress=not quiet, overwrite=overwrite)
    for f in cv.summary["folds"]:
        console.print(f"fold {f['fold']}: val AUC {f['val_auc']:.3f}, test AUC {f['test_auc'] or float('nan'):.3f}")
    for key in ("val_auc", "test_auc"):
        if key in cv.summary:
            console.print(f"{key.replace('_', ' ')} {cv.summary[key]['mean']:.3f} ± {cv.summary[key]['sd']:.3f} ({folds} folds)")
    return cv.out_dir


def _print_run_summary(m: dict) -> None:
    """Minutes, best epoch or ensemble size, validation AUC, the recipe kept (if several were fitted), test."""
    val_auc = (m.get("val") or {}).get("auc")
    members = m.get("members")
    console.print(f"[bold green]done[/] in {m['minutes']:.1f} min; "
                  + (f"ensemble of {len(members)}; " if members else f"best epoch {m.get('best_epoch')}; ")
                  + (f"val AUC {val_auc:.3f}" if val_auc is not None else "val AUC undefined"))
    if m.get("recipe_selection"):
        console.print(f"recipe kept: {m['recipe_selection']['reason']}", highlight=False)
    if m.get("test"):
        _print_test_summary(m)


def _print_test_summary(m: dict) -> None:
    """The test AUC with its CI, and the rates at the validation operating point (binary runs)."""
    t = m["test"]
    ci = t.get("auc_ci") or [None, None]
    auc = "undefined (one class)" if t.get("auc") is None else f"{t['auc']:.3f}"
    ci_txt = f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if None not in ci else ""
    console.print(f"test AUC {auc}{ci_txt} on {t['n']} images / {t.get('n_patients', '?')} patients")
    op = (m.get("operating_point") or {}).get("test") or {}
    rates = [f"{k} {op[k]:.3f}" + (f" (95% CI {op[k + '_ci'][0]:.3f}–{op[k + '_ci'][1]:.3f})"
                                   if None not in (op.get(k + "_ci") or [None]) else "")
             for k in ("sensitivity", "specificity") if op.get(k) is not None]
    if rates:
        threshold = m["operating_point"].get("threshold")
        console.print(f"at the validation operating point (threshold {threshold:.3g}): " + ", ".join(rates))


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="Run directory written by 'medtransfer finetune'."),
    input_dir: str = typer.Argument(..., help="Folder of DICOM files (searched recursively; any file name); NIfTI and PNG / JPEG files are read too. " + pacs.PACS_HELP),
    out: Path = typer.Option(Path("predictions.csv"), "--out", "-o", help="Output CSV (streamed to OUT.partial, moved into place when done)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    workers: int = typer.Option(0, "--workers", "-j", min=0, help="Local engine: decoding processes running beside the model (0: decode in the main process)."),
    resume: bool = typer.Option(False, "--resume", help="Keep the rows of a previous or interrupted run in OUT and do only the rest."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: do the i-th (0-based) of n contiguous blocks of the sorted inputs; outputs of 0/n … n-1/n concatenate to the full run."),
    modality: list[str] = typer.Option([], "--modality", help="Only these DICOM Modality codes (repeatable), e.g. --modality DX --modality CR."),
    series_description: Optional[str] = typer.Option(None, "--series-description", help="Only series whose SeriesDescription matches this regular expression."),
    min_slices: int = typer.Option(1, "--min-slices", min=1, help="3D models: skip series with fewer slices."),
    parquet: bool = typer.Option(False, "--parquet", help="Also write OUT with a .parquet suffix (needs pyarrow)."),
    study_json: Optional[Path] = typer.Option(None, "--study-json", help="Also write one JSON per study (rows, counts, study-level maximum per class) into this folder."),
    patient_fields: bool = typer.Option(False, "--patient-fields", help="Add patient_id, patient_name and patient_birth_date columns (identifying data: off by default)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …"),
    engine: Engine = typer.Option(Engine.local, "--engine", help="local: this machine, decoding in --workers processes; ray: a Ray cluster, decoding as CPU tasks and the model in actors (pip install \"medtransfer\\[ray]\")."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray engine: the cluster to join, 'auto' (the one 'ray start' runs on this machine) or HEAD_IP:PORT; omitted: a Ray instance for this job alone."),
    actors: Optional[int] = typer.Option(None, "--actors", min=1, help="Ray engine: model actors (default: one per GPU with --num-gpus-per-actor, else 1)."),
    num_gpus_per_actor: float = typer.Option(0.0, "--num-gpus-per-actor", min=0, help="Ray engine: GPUs each model actor reserves, e.g. 1 (0: CPU actors)."),
    cpus_per_actor: float = typer.Option(1.0, "--cpus-per-actor", min=0.01, help="Ray engine: CPU cores each model actor reserves (on CPU actors also its torch threads)."),
    saliency: Optional[Path] = typer.Option(None, "--saliency", help="Also write a saliency map per predicted input into this folder: an overlay PNG (the image as the model saw it, the map, class and probability) and, for 3D models, a NIfTI map on the input's grid (its shape and affine)."),
    saliency_method: str = typer.Option("gradcam", "--saliency-method", help="gradcam, gradcampp (Grad-CAM++; both on the backbone's registered layer) or occlusion (model-agnostic, ~50x slower)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    where: list[str] = typer.Option([], "--where", help=pacs.WHERE_HELP),
    send_to: Optional[str] = typer.Option(None, "--send-to", help=pacs.SEND_TO_HELP),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help=pacs.RESULTS_DIR_HELP),
    pacs_config: Optional[Path] = typer.Option(None, "--pacs-config", help=pacs.PACS_CONFIG_HELP),
    pacs_set: list[str] = typer.Option([], "--pacs-set", help=pacs.PACS_SET_HELP),
) -> None:
    """Predict every file under INPUT_DIR (or found by a PACS query); one CSV row each (per series in 3D).

    Columns: path, status (ok / skipped / error), reason, SOP/study/series instance UIDs, one
    prob_<class> column per class, predicted (at the operating point chosen on validation).
    Broken DICOM files are 'error'; files that are not DICOM (README, viewer programs), hidden files
    (._*, .DS_Store), DICOM objects without an image (SR, RTSTRUCT) and images outside the selection
    are 'skipped'; hidden folders are not entered. The batch always finishes. No patient names or
    birth dates are written unless --patient-fields asks for them. --study-json DIR adds one JSON per
    study.

    From a PACS (dicomweb://… or dimse://…): one row per instance the query finds, path
    studies/<uid>/series/<uid>/instances/<uid>; retrieval failures are 'error' rows (not
    retrievable, timed out, rejected); results go to --results-dir as DICOM SR (TID 1500, per
    study; per series in 3D) or SEG, and to --send-to.

    Exit code 0 when at least one input was predicted, 1 otherwise.

    Examples:

      medtransfer predict runs/demo /data/inbox --out preds.csv --workers 2

      medtransfer predict runs/demo /data/inbox --out part0.csv --shard 0/4   # on machine 0 of 4

      medtransfer predict runs/demo /data/inbox --out preds.csv --study-json reports/ --parquet

      medtransfer predict runs/demo /shared/inbox --out preds.csv --engine ray --address auto --num-gpus-per-actor 1

      medtransfer predict runs/demo /data/inbox --out preds.csv --saliency maps/   # + Grad-CAM overlays

      medtransfer predict runs/cxr "dicomweb://pacs:8042/dicom-web?StudyDate=20240101-20240131&Modality=CR" --send-to dicomweb://pacs:8042/dicom-web

      medtransfer predict runs/ct3d "dimse://PACS@pacs:11112?Modality=CT" --where SliceThickness=2.5:5 --pacs-set retrieve=move
    """
    from medtransfer.hospital import is_pacs_url
    from medtransfer.inference import predict_folder
    from medtransfer.inference.batch import PredictOptions, SeriesFilter, parse_shard
    from medtransfer.run import is_segmentation_run

    if is_pacs_url(input_dir):
        if engine is Engine.ray or saliency is not None:
            raise UsageError("A PACS source runs on the local engine without --saliency (--engine ray and "
                             "--saliency read folders).")
        return pacs.predict_pacs(
            run_dir, input_dir, out=out, batch_size=batch_size, workers=workers, resume=resume, shard=shard,
            modality=modality, series_description=series_description, min_slices=min_slices, where=where,
            patient_fields=patient_fields, study_json=study_json, parquet=parquet, device=device, quiet=quiet,
            send_to=send_to, results_dir=results_dir, pacs_config=pacs_config, pacs_set=pacs_set)
    _setup_logging(quiet)
    if where or send_to or results_dir or pacs_config or pacs_set:
        raise UsageError("--where, --send-to, --results-dir, --pacs-config and --pacs-set apply to PACS sources "
                         "(dicomweb://… or dimse://…), not to a folder.")
    input_dir = Path(input_dir)
    if is_segmentation_run(run_dir):
        if engine is Engine.ray:
            raise UsageError("--engine ray predicts with classification runs; for a segmentation run use --engine "
                             "local (or 'medtransfer segment predict'), one machine per set of inputs.")
        from medtransfer.segmentation.inference import predict_segmentation

        out_dir = out.with_suffix("") if out.suffix == ".csv" else out
        rows = predict_segmentation(run_dir, [input_dir], out_dir)
        n_ok = sum(r.get("status") == "ok" for r in rows)
        console.print(f"segmentation: {n_ok} of {len(rows)} inputs ok -> {out_dir} (masks, volumes.csv)")
        raise typer.Exit(0 if n_ok else 1)
    options = PredictOptions(
        batch_size=batch_size, workers=workers, resume=resume, shard=parse_shard(shard), parquet=parquet,
        study_json_dir=study_json, patient_fields=patient_fields, progress=not quiet,
        series_filter=SeriesFilter(tuple(m.upper() for m in modality), series_description, min_slices))
    if engine is Engine.ray:
        from medtransfer.inference.ray_engine import RayOptions, run_batch_ray

        if saliency is not None:
            raise UsageError("--saliency runs with --engine local (the maps are written beside the model).")
        summary = run_batch_ray(run_dir, input_dir, out, options, device=device,
                                ray_options=RayOptions(address, actors, num_gpus_per_actor, cpus_per_actor))
    elif saliency is not None:
        from medtransfer.inference.saliency import predict_with_saliency

        summary = predict_with_saliency(run_dir, input_dir, out, saliency, saliency_method, device, options)
    else:
        summary = predict_folder(run_dir, input_dir, out, options, device=device)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    console.print(f"{sum(summary.counts.values())} inputs: {counts} -> {summary.out_csv}")
    if engine is Engine.ray:
        for line in summary.report_lines():
            console.print(line, highlight=False)
    if summary.n_ok == 0:
        console.print("[bold red]no input could be predicted[/]; see the reason column.")
        raise typer.Exit(1)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run directory written by 'medtransfer finetune'."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Labelled data: a DICOM folder (with --labels) or a .npz. Omitted: the run's own test split of the demo set."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l", help="CSV with path,label[,patient_id][,split]."),
    split: Optional[str] = typer.Option(None, "--split", help="Evaluate only this split (train/val/test/all). Default: test for .npz and the demo, all rows for a CSV."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/evaluation)."),
    device: str = typer.Option("auto", "--device"),
    no_gallery: bool = typer.Option(False, "--no-gallery", help="Leave the saliency gallery out of the report (binary runs get one by default)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Evaluate a trained run on a labelled set, with the operating point it chose on validation.

    Writes metrics.json (AUC with a 95% CI by bootstrap over patients, sensitivity, specificity,
    PPV, NPV at the operating point, calibration), predictions_test.csv, plots/ (with a saliency
    gallery of the most confident true positives, false positives and false negatives), model_card.md
    and report.html (everything on one self-contained page).

    Example: medtransfer evaluate runs/demo --data dicoms/ --labels labels.csv --out runs/demo/site2
    """
    from medtransfer.inference.evaluate import evaluate_run

    _setup_logging(quiet)
    report_dir = out or Path(run_dir) / "evaluation"
    metrics = evaluate_run(run_dir, data, labels, split, out, device, gallery=not no_gallery)
    _print_test_summary(metrics)
    typer.echo(str(report_dir))


@app.command()
def compare(
    run_a: Path = typer.Argument(..., help="First run directory."),
    run_b: Path = typer.Argument(..., help="Second run directory."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Labelled test data (as for evaluate)."),
    labels: Optional[Path] = typer.Option(None, "--labels", "-l"),
    split: Optional[str] = typer.Option(None, "--split"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the comparison as JSON here."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Compare the AUCs of two binary runs on the same test set.

    Reports DeLong's test (difference, 95% CI, p-value) and a paired bootstrap over patients.
    """
    from medtransfer.inference.evaluate import compare_runs

    _setup_logging(True)
    r = compare_runs(run_a, run_b, data, labels, split, out, device=device)
    d, b = r["delong"], r["paired_bootstrap"]
    console.print(f"n = {r['n']} images / {r['n_patients']} patients")
    console.print(f"AUC A {d['auc_a']:.3f}, AUC B {d['auc_b']:.3f}, difference {d['diff']:+.3f}")
    console.print(f"DeLong: 95% CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}, p = {d['p_value']:.4f}")
    console.print(f"paired bootstrap over patients: 95% CI {b['ci_low']:+.3f} to {b['ci_high']:+.3f}")


@app.command()
def backbones(
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON (for scripts)."),
) -> None:
    """List registered backbones and weights: source, dims, parameters, available offline.

    Piped or redirected, the table is printed 200 columns wide (set COLUMNS to choose).
    """
    from rich.table import Table

    from medtransfer.backbones import count_parameters, list_weights
    from medtransfer.backbones.sources import CacheSource
    from medtransfer.cli._console import table_console

    rows = []
    for spec in list_weights():
        local = [s for s in spec.sources if not hasattr(s, "url") and not hasattr(s, "repo_id")]
        offline = (not spec.sources or CacheSource().available(spec.name)
                   or any(s.available(spec.name) for s in local))
        rows.append({"name": spec.name, "dims": spec.dims, "in_channels": spec.in_channels,
                     "parameters": count_parameters(spec), "input": spec.intensity,
                     "sources": [s.describe() for s in spec.sources], "offline": bool(offline),
                     "licence": spec.license})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="medtransfer backbones")
    for col in ("name", "dims", "in ch", "params", "offline"):
        table.add_column(col, no_wrap=True)
    for col in ("input", "source", "licence"):
        table.add_column(col, overflow="fold", ratio=1)
    for r in rows:
        table.add_row(r["name"], f"{r['dims']}D", str(r["in_channels"]), f"{r['parameters'] / 1e6:.2f}M",
                      "yes" if r["offline"] else "no", r["input"], "; ".join(r["sources"]) or "random init only",
                      r["licence"])
    table_console().print(table)


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder to write the SYNTHETIC demo DICOM files and labels.csv into."),
    patients: int = typer.Option(72, "--patients", min=2, help="Number of synthetic patients (3–4 images each)."),
    seed: int = typer.Option(2024, "--seed"),
) -> None:
    """Write the built-in SYNTHETIC chest-radiograph-like DICOM dataset (not patient data).

    DX/CR images with 12–16-bit stored values, rescale slope/intercept, window tags, a mix of
    MONOCHROME1 and MONOCHROME2, several images per patient, a binary 'opacity' finding, and a
    labels.csv (path,label,patient_id).
    """
    from medtransfer.data.demo import generate_demo_dataset

    path = generate_demo_dataset(out_dir, n_patients=patients, seed=seed)
    typer.echo(str(path))


from medtransfer.cli.export_cmd import export_command  # noqa: E402
from medtransfer.cli.inspect_cmd import inspect_command  # noqa: E402
from medtransfer.cli.serve_cmd import serve_command  # noqa: E402
from medtransfer.cli.segment_cmd import segment_app  # noqa: E402
from medtransfer.cli.weights_cmd import weights_app  # noqa: E402

app.command("inspect")(inspect_command)
app.command("export")(export_command)
app.command("serve")(serve_command)
app.add_typer(weights_app, name="weights")
app.add_typer(segment_app, name="segment")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
