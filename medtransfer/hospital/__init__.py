"""Hospital integration: a PACS as a source (DICOMweb QIDO/WADO, DIMSE C-FIND/C-GET/C-MOVE) and as
a destination (STOW-RS, C-STORE) of DICOM SR and SEG results, and a DIMSE listener.

Needs the ``pacs`` extra (``pip install "medtransfer[pacs]"``: pynetdicom, dicomweb-client).
"""
from __future__ import annotations

from medtransfer.utils.lazy import lazy_exports

# Names exported lazily (PEP 562): ``import medtransfer.hospital.sr`` in the report process must not
# import the prediction pipeline (and torch) with it.
_EXPORTS = {
    "ConnectionSettings": "connection", "PacsEndpoint": "connection", "PacsError": "connection",
    "is_pacs_url": "connection", "load_settings": "connection", "parse_pacs_url": "connection",
    "default_results_dir": "jobs", "predict_from_pacs": "jobs", "open_pacs": "pacs",
    "PacsJobOptions": "pipeline", "PacsSummary": "pipeline",
    "HeaderRange": "selection", "Selection": "selection", "parse_range": "selection",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
