"""TID 1501 measurement groups written directly as pydicom content items.

A 2D model's report has one group per predicted image. highdicom builds each item through
validating constructors and then, in the SR document's constructor, deep-copies, re-parses and
searches the whole content tree: 6–20 ms of CPU per image (by machine), up to a second or more per
study, more than retrieving and predicting the study. These functions write the same items (same attributes,
values and value representations, in the same order; ``tests/test_hospital_sr.py`` checks them
equal to highdicom's for every group of a report) for the few value types a classification group
uses: CONTAINER, TEXT, UIDREF, NUM, CODE and IMAGE.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DS

MEASUREMENT_GROUP = codes.DCM.MeasurementGroup
TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier
TRACKING_UID = codes.DCM.TrackingUniqueIdentifier
ALGORITHM_NAME = codes.DCM.AlgorithmName
ALGORITHM_VERSION = codes.DCM.AlgorithmVersion
ALGORITHM_PARAMETERS = codes.DCM.AlgorithmParameters
DERIVATION = codes.DCM.Derivation
SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement
IMAGING_MEASUREMENTS = codes.DCM.ImagingMeasurements
NO_UNITS = codes.UCUM.NoUnits
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
MAXIMUM = codes.SCT.Maximum


@dataclass(frozen=True)
class GroupContent:
    """What one measurement group says: its tracking identifier (text and UID), the algorithm (with
    its parameters in the report's first group), one probability per class (``derivation``: how a
    study-level value was derived from its images), the decisions, and the source images."""

    tracking_id: str
    tracking_uid: str
    algorithm_name: str
    algorithm_version: str
    algorithm_parameters: tuple[str, ...]
    probabilities: tuple[tuple[Code, float], ...]
    decisions: tuple[tuple[Code, bool], ...]
    sources: tuple[tuple[str, str], ...]
    """``(sop_class_uid, sop_instance_uid)`` of each source image."""
    derivation: Code | None = None


def code_item(code: Code) -> Dataset:
    """A code sequence item (short code values only: every code of a classification report)."""
    if len(code.value) > 16:
        raise ValueError(f"code value {code.value!r} is longer than 16 characters (needs LongCodeValue)")
    ds = Dataset()
    ds.CodeValue = code.value
    ds.CodingSchemeDesignator = code.scheme_designator
    if code.scheme_version:
        ds.CodingSchemeVersion = code.scheme_version
    ds.CodeMeaning = code.meaning
    return ds


def _item(value_type: str, name: Code, relationship: str) -> Dataset:
    ds = Dataset()
    ds.ValueType = value_type
    ds.ConceptNameCodeSequence = [code_item(name)]
    ds.RelationshipType = relationship
    return ds


def text_item(name: Code, text: str, relationship: str) -> Dataset:
    ds = _item("TEXT", name, relationship)
    ds.TextValue = text
    return ds


def uidref_item(name: Code, uid: str, relationship: str) -> Dataset:
    ds = _item("UIDREF", name, relationship)
    ds.UID = uid
    return ds


def code_value_item(name: Code, value: Code, relationship: str) -> Dataset:
    ds = _item("CODE", name, relationship)
    ds.ConceptCodeSequence = [code_item(value)]
    return ds


def num_item(name: Code, value: float, unit: Code, derivation: Code | None = None) -> Dataset:
    """A CONTAINS NUM item: the value as DS (auto-formatted to 16 characters) and as FD."""
    ds = _item("NUM", name, "CONTAINS")
    measured = Dataset()
    measured.NumericValue = DS(value, auto_format=True)
    measured.FloatingPointValue = float(value)
    measured.MeasurementUnitsCodeSequence = [code_item(unit)]
    ds.MeasuredValueSequence = [measured]
    if derivation is not None:
        ds.ContentSequence = [code_value_item(DERIVATION, derivation, "HAS CONCEPT MOD")]
    return ds


def image_item(name: Code, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    ds = _item("IMAGE", name, "CONTAINS")
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class_uid
    ref.ReferencedSOPInstanceUID = sop_instance_uid
    ds.ReferencedSOPSequence = [ref]
    return ds


def measurement_group(group: GroupContent) -> Dataset:
    """The TID 1501 CONTAINS CONTAINER item of one group, as highdicom's
    ``MeasurementsAndQualitativeEvaluations`` encodes it."""
    container = _item("CONTAINER", MEASUREMENT_GROUP, "CONTAINS")
    container.ContinuityOfContent = "CONTINUOUS"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "1501"
    container.ContentTemplateSequence = [template]
    container.ContentSequence = _group_items(group)
    return container


def _group_items(group: GroupContent) -> list[Dataset]:
    items = [text_item(TRACKING_IDENTIFIER, group.tracking_id, "HAS OBS CONTEXT"),
             uidref_item(TRACKING_UID, group.tracking_uid, "HAS OBS CONTEXT"),
             text_item(ALGORITHM_NAME, group.algorithm_name, "HAS CONCEPT MOD"),
             text_item(ALGORITHM_VERSION, group.algorithm_version, "HAS CONCEPT MOD")]
    items += [text_item(ALGORITHM_PARAMETERS, p, "HAS CONCEPT MOD") for p in group.algorithm_parameters]
    items += [num_item(name, p, NO_UNITS, group.derivation) for name, p in group.probabilities]
    items += [code_value_item(name, PRESENT if present else ABSENT, "CONTAINS") for name, present in group.decisions]
    items += [image_item(SOURCE_OF_MEASUREMENT, c, u) for c, u in group.sources]
    return items

