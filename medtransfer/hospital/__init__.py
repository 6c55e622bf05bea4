"""Hospital integration: a PACS as a source (DICOMweb QIDO/WADO, DIMSE C-FIND/C-GET/C-MOVE) and as
a destination (STOW-RS, C-STORE) of DICOM SR and SEG results, and a DIMSE listener.

Needs the ``pacs`` extra (``pip install "medtransfer[pacs]"``: pynetdicom, dicomweb-client).
"""
from medtransfer.hospital.connection import (
    ConnectionSettings,
    PacsEndpoint,
    PacsError,
    is_pacs_url,
    load_settings,
    parse_pacs_url,
)
from medtransfer.hospital.jobs import default_results_dir, predict_from_pacs
from medtransfer.hospital.pacs import open_pacs
from medtransfer.hospital.pipeline import PacsJobOptions, PacsSummary
from medtransfer.hospital.selection import HeaderRange, Selection, parse_range

__all__ = [
    "ConnectionSettings",
    "HeaderRange",
    "PacsEndpoint",
    "PacsError",
    "PacsJobOptions",
    "PacsSummary",
    "Selection",
    "default_results_dir",
    "is_pacs_url",
    "load_settings",
    "open_pacs",
    "parse_pacs_url",
    "parse_range",
    "predict_from_pacs",
]
