"""Open a PACS by its address: DICOMweb or DIMSE behind one interface (``query``, ``retrieve``,
``store``, ``describe``, ``close``)."""
from __future__ import annotations

from medtransfer.hospital.connection import ConnectionSettings, PacsEndpoint, parse_pacs_url


def open_pacs(endpoint: PacsEndpoint | str, settings: ConnectionSettings):
    """A :class:`~medtransfer.hospital.dicomweb.DicomWebPacs` or :class:`~medtransfer.hospital.dimse.DimsePacs`."""
    if isinstance(endpoint, str):
        endpoint = parse_pacs_url(endpoint)
    if endpoint.is_dimse:
        from medtransfer.hospital.dimse import DimsePacs

        return DimsePacs(endpoint, settings)
    from medtransfer.hospital.dicomweb import DicomWebPacs

    return DicomWebPacs(endpoint, settings)
