"""``medtransfer predict RUN_DIR dicomweb://… | dimse://…``: predict from a PACS (the part of
``predict`` that a PACS address dispatches to) and the options it shares with ``serve``.

Exit codes: 0 at least one input predicted; 1 nothing predicted, the PACS could not be queried, or
a result could not be sent; 2 bad usage or settings (errors reach the CLI's one error path).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from medtransfer.cli._console import console, setup_logging
from medtransfer.errors import MedTransferError, UsageError

PACS_HELP = (
    "PACS sources: dicomweb://HOST:PORT/PATH?KEY=VALUE&… (dicomwebs:// for HTTPS) or dimse://AET@HOST:PORT?KEY=VALUE&…, "
    "KEY a DICOM keyword (StudyDate=20240101-20240131, Modality=CR, AccessionNumber=…)."
)
WHERE_HELP = "PACS sources: numeric range on a header attribute, repeatable: --where SliceThickness=2.5:5 (an end may stay open)."
SEND_TO_HELP = "PACS sources: store the SR / SEG results on this PACS too (dicomweb://… STOW-RS or dimse://AET@HOST:PORT C-STORE)."
RESULTS_DIR_HELP = "PACS sources: folder for the SR / SEG results (default OUT without suffix + '-results')."
PACS_CONFIG_HELP = ("PACS connection settings (YAML): calling_aet, timeout, retries, backoff, retrieve (get/move), move_aet, "
                    "move_port, move_bind, chunk_size, spool_dir, username, password_env / password_file, token_env / "
                    "token_file, ca_cert, client_cert, client_key, verify_tls.")
PACS_SET_HELP = "One PACS setting, repeatable: --pacs-set timeout=10 --pacs-set retrieve=move (secrets only as *_env / *_file)."


def settings_from_options(pacs_config: Optional[Path], pacs_set: list[str]):
    """The connection settings of a command (file, then ``--pacs-set`` overrides; a bad one is a ConfigError)."""
    from medtransfer.hospital import load_settings

    return load_settings(pacs_config, pacs_set)


def selection_from_options(modality: list[str], series_description: Optional[str], min_slices: int, where: list[str]):
    """The selection of ``predict`` / ``serve`` options (raises ConfigError on a bad ``--where``)."""
    from medtransfer.hospital import Selection, parse_range
    from medtransfer.inference.batch import SeriesFilter

    return Selection(SeriesFilter(tuple(m.upper() for m in modality), series_description, min_slices),
                     tuple(parse_range(w) for w in where))


def job_options(selection, settings, **predict) -> "PacsJobOptions":  # noqa: F821
    """The job's options: the batch options shared with the folder engines, the ranges, the chunk size."""
    from medtransfer.hospital import PacsJobOptions
    from medtransfer.inference.batch import PredictOptions

    return PacsJobOptions(PredictOptions(series_filter=selection.series_filter, **predict), selection.ranges,
                          settings.chunk_size, settings.spool_dir or None)


def predict_pacs(run_dir: Path, source: str, *, out: Path, batch_size: int, workers: int, resume: bool,
                 shard: Optional[str], modality: list[str], series_description: Optional[str], min_slices: int,
                 where: list[str], patient_fields: bool, study_json: Optional[Path], parquet: bool, device: str,
                 quiet: bool, send_to: Optional[str], results_dir: Optional[Path], pacs_config: Optional[Path],
                 pacs_set: list[str]) -> None:
    """Run ``predict`` over what a PACS query finds; print the counts; exit as documented above."""
    from medtransfer.hospital import parse_pacs_url, predict_from_pacs
    from medtransfer.inference.batch import parse_shard

    setup_logging(quiet)
    settings = settings_from_options(pacs_config, pacs_set)
    try:
        parse_pacs_url(source)
        if send_to:
            parse_pacs_url(send_to)
        selection = selection_from_options(modality, series_description, min_slices, where)
        options = job_options(selection, settings, batch_size=batch_size, workers=workers, resume=resume,
                              shard=parse_shard(shard), patient_fields=patient_fields, parquet=parquet,
                              study_json_dir=study_json, progress=not quiet)
    except MedTransferError as exc:  # found before any work: bad usage
        raise UsageError(str(exc)) from None
    from medtransfer.run import is_segmentation_run

    if study_json is not None and is_segmentation_run(run_dir):
        raise UsageError("--study-json summarises classification rows; a segmentation run writes SEG objects.")
    summary = predict_from_pacs(run_dir, source, out, settings, options, send_to=send_to, results_dir=results_dir,
                                device=device)
    _report(summary, send_to)


def _report(summary, send_to: Optional[str]) -> None:
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    console.print(f"{sum(summary.counts.values())} inputs: {counts} -> {summary.out_csv}")
    res = summary.results
    console.print(f"results: {res.get('written', 0)} written to {summary.results_dir}"
                  + (f", {res.get('sent', 0)} sent" if send_to else ""))
    for line in summary.result_failures[:10]:
        console.print(f"  not delivered: {line}", highlight=False)
    if summary.n_ok == 0:
        console.print("[bold red]no input could be predicted[/]; see the reason column.")
        raise typer.Exit(1)
    if summary.result_failures:
        console.print("[bold red]some results were not delivered[/]; run again with --resume to send them.")
        raise typer.Exit(1)
