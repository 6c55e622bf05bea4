"""``predict RUN_DIR dicomweb://…`` / ``dimse://…``: one entry point for classification and
segmentation runs, results written to a folder and optionally sent on."""
from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from pathlib import Path

from medtransfer.hospital.connection import ConnectionSettings, parse_pacs_url
from medtransfer.hospital.pacs import open_pacs
from medtransfer.hospital.pipeline import (
    PacsJobOptions,
    PacsSummary,
    predict_classification,
    query_in_background,
)
from medtransfer.hospital.results import ResultSink

logger = logging.getLogger(__name__)


def default_results_dir(out_csv: str | os.PathLike[str]) -> Path:
    """``preds.csv`` → ``preds-results/`` (reports and SEG objects of the job)."""
    out = Path(out_csv)
    return out.with_name(f"{out.stem}-results")


def predict_from_pacs(run_dir: str | os.PathLike[str], source: str, out_csv: str | os.PathLike[str],
                      settings: ConnectionSettings | None = None, options: PacsJobOptions | None = None, *,
                      send_to: str | None = None, results_dir: str | os.PathLike[str] | None = None,
                      device: str = "auto") -> PacsSummary:
    """Query the PACS at ``source``, retrieve and predict what it finds, write the rows to
    ``out_csv`` and the SR / SEG objects to ``results_dir`` (sent to ``send_to`` when given)."""
    settings = settings or ConnectionSettings()
    options = options or PacsJobOptions(chunk_size=settings.chunk_size)
    endpoint = parse_pacs_url(source)
    destination_endpoint = parse_pacs_url(send_to) if send_to else None
    logger.info("source %s (%s)", endpoint.describe(), settings.describe())
    pacs = open_pacs(endpoint, settings)
    destination = open_pacs(destination_endpoint, settings) if destination_endpoint else None
    try:
        sink = ResultSink(results_dir or default_results_dir(out_csv), destination)
        with query_in_background(pacs, options.selection) as query:
            return _predict(run_dir, pacs, query, out_csv, sink, options, device)
    finally:
        pacs.close()
        if destination is not None:
            destination.close()


def _predict(run_dir: str | os.PathLike[str], pacs, query: Future, out_csv: str | os.PathLike[str],
             sink: ResultSink, options: PacsJobOptions, device: str) -> PacsSummary:
    """Load the run (while ``query`` runs) and predict what the query found, by the run's task."""
    from medtransfer.run import is_segmentation_run

    if is_segmentation_run(run_dir):
        from medtransfer.hospital.segjob import predict_segmentation_pacs

        return predict_segmentation_pacs(run_dir, pacs, query, out_csv, sink, options)
    from medtransfer.inference import load_run

    return predict_classification(load_run(run_dir, device), pacs, query, out_csv, sink, options)
