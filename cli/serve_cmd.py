"""``medtransfer serve RUN_DIR``: receive studies by C-STORE, predict, send the results on.

Exit codes: 0 stopped by SIGTERM / SIGINT; 1 it could not start (port in use, bad run directory);
2 bad usage or settings.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from medtransfer.cli._console import console, setup_logging
from medtransfer.cli.pacs_cmd import (
    PACS_CONFIG_HELP,
    PACS_SET_HELP,
    WHERE_HELP,
    job_options,
    selection_from_options,
    settings_from_options,
)
from medtransfer.errors import MedTransferError, UsageError


def serve_command(
    run_dir: Path = typer.Argument(..., help="Run directory (classification or segmentation) whose model predicts what arrives."),
    dimse_port: int = typer.Option(11112, "--dimse-port", min=1, max=65535, help="TCP port of the storage SCP."),
    ae_title: str = typer.Option("MEDTRANSFER", "--ae-title", help="Our AE title (what senders call)."),
    bind: str = typer.Option("0.0.0.0", "--bind", help="Address to listen on (127.0.0.1: this machine only)."),
    state_dir: Path = typer.Option(Path("medtransfer-serve"), "--state-dir", help="Journal, received images, rows/<batch>.csv and results/ live here; keep it across restarts."),
    quiet_period: float = typer.Option(10.0, "--quiet-period", min=0.0, help="Seconds without a new instance of a study before the study is predicted."),
    send_to: Optional[str] = typer.Option(None, "--send-to", help="Destination of the SR / SEG results: dicomweb://… (STOW-RS) or dimse://AET@HOST:PORT (C-STORE)."),
    results_dir: Optional[Path] = typer.Option(None, "--results-dir", help="Folder for the SR / SEG results (default STATE_DIR/results)."),
    allow_aet: list[str] = typer.Option([], "--allow-aet", help="Only these calling AE titles may store (repeatable; default: any)."),
    max_associations: int = typer.Option(10, "--max-associations", min=1, help="Concurrent associations accepted."),
    keep_images: bool = typer.Option(False, "--keep-images", help="Keep received images after their results are delivered."),
    modality: list[str] = typer.Option([], "--modality", help="Only these Modality codes are predicted (others get 'skipped' rows)."),
    series_description: Optional[str] = typer.Option(None, "--series-description", help="Only series whose SeriesDescription matches this regular expression."),
    min_slices: int = typer.Option(1, "--min-slices", min=1, help="3D models: skip series with fewer slices."),
    where: list[str] = typer.Option([], "--where", help=WHERE_HELP.replace("PACS sources: n", "N")),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per model batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …"),
    pacs_config: Optional[Path] = typer.Option(None, "--pacs-config", help=PACS_CONFIG_HELP),
    pacs_set: list[str] = typer.Option([], "--pacs-set", help=PACS_SET_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    """Listen for studies sent by C-STORE, predict each one once it is complete, send the results on.

    A study is complete when nothing of it arrived for --quiet-period seconds. Every instance is on
    disk and in the journal (STATE_DIR/journal.sqlite) before its C-STORE is answered; a restart
    with the same --state-dir takes up what was received, predicted or not yet delivered, and
    predicts nothing twice. Rows go to STATE_DIR/rows/<batch>.csv (no names or birth dates); SR
    (classification) or SEG (segmentation) results to --results-dir and --send-to. SIGTERM stops
    accepting associations, finishes the study in hand and exits 0.

    Examples:

      medtransfer serve runs/cxr --dimse-port 11112 --ae-title MEDTRANSFER --send-to dimse://PACS@pacs:11112

      medtransfer serve runs/cxr --send-to dicomweb://pacs:8042/dicom-web --pacs-set token_env=PACS_TOKEN --quiet-period 30
    """
    from medtransfer.hospital import parse_pacs_url
    from medtransfer.hospital.serve import ServeOptions

    setup_logging(quiet)
    settings = settings_from_options(pacs_config, pacs_set)
    try:
        if send_to:
            parse_pacs_url(send_to)
        selection = selection_from_options(modality, series_description, min_slices, where)
    except MedTransferError as exc:  # found before any work: bad usage
        raise UsageError(str(exc)) from None
    options = ServeOptions(state_dir=state_dir, port=dimse_port, ae_title=ae_title, bind=bind, quiet_period=quiet_period,
                           send_to=send_to, results_dir=results_dir, allow_aets=tuple(allow_aet),
                           max_associations=max_associations, keep_images=keep_images,
                           job=job_options(selection, settings, batch_size=batch_size))
    _run_until_signalled(run_dir, options, settings, device)


def _run_until_signalled(run_dir: Path, options, settings, device: str) -> None:
    """Serve until SIGTERM or SIGINT (the batch in hand is finished first)."""
    from medtransfer.hospital.serve import Listener

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Listener(run_dir, options, settings, device).serve_forever(stop)
    console.print("medtransfer serve stopped")
