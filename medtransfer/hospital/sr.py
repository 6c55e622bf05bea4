"""Classification results as a DICOM Comprehensive SR, TID 1500 Measurement Report (highdicom).

One report per study (2D models: one measurement group per predicted image, after a study group
with each class's highest probability) or per series (3D models: one group for the series). Each
group carries, per class, the probability (TID 300 measurement, unit "no units") and the decision
at the run's operating point (TID 1501 qualitative evaluation: Present / Absent; for a binary model
of its positive class), the algorithm identification (TID 4019: model name and version; the first
group also its parameters: the sha256 of model.pt, backbone, classes, operating point) and
references to its source images; the report's evidence lists every source instance. Patient and study identity are
copied from a source image, as a PACS files the report with the study.

highdicom builds the document and its first group; the per-image groups are written by
:mod:`medtransfer.hospital.sr_items` (checked equal to highdicom's, ``tests/test_hospital_sr.py``),
which makes a 65-image study's report 5–6× cheaper to build.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medtransfer.utils.atomic import atomic_path

if TYPE_CHECKING:  # pydicom and the item writer load with the first report, not with the job's modules
    from pydicom.dataset import Dataset
    from pydicom.sr.coding import Code

    from medtransfer.hospital.sr_items import GroupContent

SCHEME = "99MEDTRANSFER"
"""Private coding scheme of the class concepts (their meanings are the run's class names)."""
IDENTITY_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                     "ReferringPhysicianName", "StudyDescription", "SpecificCharacterSet")
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


@dataclass(frozen=True)
class ModelIdentity:
    """What the reports say about the model: name, versions, sha256 of model.pt, classes, operating point."""

    name: str
    version: str
    sha256: str
    backbone: str
    label_names: tuple[str, ...]
    operating_point: str

    binary: bool = False

    def decided_classes(self) -> range:
        """Classes with a Present / Absent decision: the positive class of a binary model, else all."""
        return range(1, 2) if self.binary else range(len(self.label_names))

    def parameters(self) -> list[str]:
        return [f"model_sha256={self.sha256}", f"backbone={self.backbone}",
                f"classes={','.join(self.label_names)}", f"operating_point={self.operating_point}"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(run) -> ModelIdentity:
    """The identity of a loaded classification run (``medtransfer.inference.load_run``)."""
    ckpt = run.checkpoint
    op = ckpt.get("operating_point") or {}
    threshold = op.get("threshold")
    if isinstance(threshold, Mapping):
        point = ";".join(f"{k}>={float(v):.4g}" for k, v in threshold.items())
    elif isinstance(threshold, (int, float)):
        point = f"p({run.label_names[-1]})>={float(threshold):.4g}"
    else:
        point = "ordinal median grade" if run.model.task == "ordinal" else "most probable class"
    trained_with = (ckpt.get("versions") or {}).get("medtransfer", "")
    return ModelIdentity(name=Path(run.run_dir).resolve().name or "medtransfer-model",
                         version=f"medtransfer {trained_with}".strip(), sha256=file_sha256(Path(run.run_dir) / "model.pt"),
                         backbone=str(ckpt.get("backbone", "")), label_names=tuple(run.label_names),
                         operating_point=point, binary=len(run.label_names) == 2 and run.model.task != "multilabel")


def identity_of(header) -> Any:
    """The patient / study attributes of a source image (what a report copies), as a new Dataset."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword in IDENTITY_KEYWORDS:
        if keyword in header and (keyword != "SpecificCharacterSet" or header.get(keyword)):
            setattr(ds, keyword, header.get(keyword))
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def stable_uid(*parts: str) -> str:
    """A UID derived from ``parts``: writing the same report twice gives the same UIDs, so a PACS
    that receives it again replaces it instead of storing a duplicate."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _evidence(identity, refs: Sequence[tuple[str, str, str]]) -> list:
    """Evidence datasets: the identity (first, as highdicom copies patient / study from it), then one
    minimal dataset per source instance ``(series_uid, sop_class_uid, sop_uid)``."""
    from pydicom.dataset import Dataset

    out = []
    for i, (series_uid, sop_class, sop_uid) in enumerate(refs):
        ds = Dataset()
        if i == 0:
            for elem in identity:
                ds.add(elem)
        ds.StudyInstanceUID = identity.StudyInstanceUID
        ds.SeriesInstanceUID, ds.SOPClassUID, ds.SOPInstanceUID = series_uid, sop_class, sop_uid
        out.append(ds)
    return out


def _class_codes(model: ModelIdentity) -> tuple[list[Code], list[Code]]:
    from pydicom.sr.coding import Code

    prob = [Code(f"prob{i}", SCHEME, f"Probability of {n}"[:64]) for i, n in enumerate(model.label_names)]
    finding = [Code(f"class{i}", SCHEME, str(n)[:64]) for i, n in enumerate(model.label_names)]
    return prob, finding


def group_content(model: ModelIdentity, tracking: tuple[str, ...], probs: Sequence[float], predicted: set[str],
                  sources: Sequence[tuple[str, str]], derivation: Code | None = None,
                  full_algorithm: bool = True) -> GroupContent:
    """What one TID 1501 group says: per class the probability and the decision, the algorithm (with its
    parameters: sha256, backbone, classes, operating point, when ``full_algorithm``), the sources."""
    from medtransfer.hospital.sr_items import GroupContent

    prob_codes, finding_codes = _class_codes(model)
    return GroupContent(
        tracking_id=tracking[-1][:64], tracking_uid=stable_uid(*tracking), algorithm_name=model.name[:64],
        algorithm_version=model.version[:64] or "0",
        algorithm_parameters=tuple(model.parameters()) if full_algorithm else (),
        probabilities=tuple((code, float(p)) for code, p in zip(prob_codes, probs)),
        decisions=tuple((finding_codes[i], model.label_names[i] in predicted) for i in model.decided_classes()),
        sources=tuple(sources), derivation=derivation)


def highdicom_group(group: GroupContent):
    """``group`` through highdicom's TID 1501 classes (the report's first group; the reference that
    :func:`medtransfer.hospital.sr_items.measurement_group` is checked against)."""
    import highdicom as hd

    from medtransfer.hospital.sr_items import ABSENT, NO_UNITS, PRESENT

    algorithm = hd.sr.AlgorithmIdentification(name=group.algorithm_name, version=group.algorithm_version,
                                              parameters=list(group.algorithm_parameters) or None)
    measurements = [hd.sr.Measurement(name=code, value=p, unit=NO_UNITS, derivation=group.derivation)
                    for code, p in group.probabilities]
    decisions = [hd.sr.QualitativeEvaluation(name=code, value=PRESENT if present else ABSENT)
                 for code, present in group.decisions]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=group.tracking_uid, identifier=group.tracking_id),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=decisions,
        source_images=[hd.sr.SourceImageForMeasurementGroup(c, u) for c, u in group.sources] or None)


def _probs(row: Mapping[str, str], model: ModelIdentity) -> list[float]:
    return [float(row[f"prob_{n}"]) for n in model.label_names]


def _predicted(row: Mapping[str, str]) -> set[str]:
    return {p for p in str(row.get("predicted") or "").split(";") if p}


def report_groups(model: ModelIdentity, ok: Sequence[Mapping[str, str]],
                  sources: Mapping[str, Sequence[tuple[str, str, str]]], per_series: bool,
                  scope: str) -> list[GroupContent]:
    """The groups of a report: for a study of several images first the study (each class's highest
    probability over its images), then one per image (3D: the series); the algorithm's parameters
    once, in the first group."""
    from medtransfer.hospital.sr_items import MAXIMUM

    groups = []
    if not per_series and len(ok) > 1:
        peak = [max(_probs(r, model)[i] for r in ok) for i in range(len(model.label_names))]
        any_predicted = set().union(*(_predicted(r) for r in ok))
        groups.append(group_content(model, (model.sha256, scope, "study"), peak, any_predicted, [],
                                    derivation=MAXIMUM))
    for n, row in enumerate(ok, start=1):
        refs = [(c, u) for _, c, u in sources[row["path"]]]
        label = "series" if per_series else f"image {n}"
        groups.append(group_content(model, (model.sha256, scope, row["path"], label), _probs(row, model),
                                    _predicted(row), refs, full_algorithm=not groups))
    return groups


def classification_report(identity, rows: Sequence[Mapping[str, str]], model: ModelIdentity,
                          sources: Mapping[str, Sequence[tuple[str, str, str]]], per_series: bool) -> Dataset:
    """A Comprehensive SR (TID 1500) for the ``ok`` rows of one study (2D) or one series (3D).

    ``sources`` maps each row's ``path`` to its instances ``(series_uid, sop_class_uid, sop_uid)``.
    highdicom builds the document with its first group; the other groups (one per image) are
    written by :mod:`medtransfer.hospital.sr_items`, the same items at a fifth of the cost (65 images).
    Returns the document as a plain pydicom dataset (read it with ``highdicom.sr.srread``).
    """
    from medtransfer.hospital.sr_items import measurement_group

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ValueError("no predicted row to report")
    study = str(identity.StudyInstanceUID)
    scope = ok[0]["series_instance_uid"] if per_series else study
    first, *others = report_groups(model, ok, sources, per_series, scope)
    refs = [ref for r in ok for ref in sources[r["path"]]]
    keys = sorted(r["path"] for r in ok)
    document = plain_dataset(sr_document(identity, model, [highdicom_group(first)], refs, study,
                                         stable_uid(model.sha256, scope, "sr", *keys)))
    _imaging_measurements(document).ContentSequence.extend(measurement_group(g) for g in others)
    return document


def sr_document(identity, model: ModelIdentity, groups: Sequence, refs: Sequence[tuple[str, str, str]], study: str,
                sop_uid: str):
    """highdicom's Comprehensive SR with a TID 1500 Measurement Report of ``groups`` (highdicom's
    group objects), the device observer being the model, ``refs`` the evidence."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medtransfer._version import __version__

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=stable_uid(model.sha256, "device"), name=model.name[:64], manufacturer_name="medtransfer",
        model_name=model.backbone[:64] or None, serial_number=model.sha256[:16])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure"),
                                     imaging_measurements=list(groups))
    return hd.sr.ComprehensiveSR(
        evidence=_evidence(identity, refs), content=report,
        series_instance_uid=stable_uid(model.sha256, study, "sr-series"), series_number=990,
        sop_instance_uid=sop_uid, instance_number=1,
        manufacturer="medtransfer", is_complete=True, is_final=False, is_verified=False,
        series_description=f"medtransfer {model.name}"[:64],
        software_versions=str(__version__), manufacturer_model_name=model.backbone[:64] or "medtransfer",
    )


def plain_dataset(ds: Dataset) -> Dataset:
    """``ds`` with every sequence item a plain :class:`~pydicom.dataset.Dataset` (highdicom's content
    sequences accept only its own item classes); elements other than sequences are shared."""
    from pydicom.dataset import Dataset

    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", [plain_dataset(item) for item in elem.value])
        else:
            out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def _imaging_measurements(document: Dataset) -> Dataset:
    """The report's Imaging Measurements container (TID 1500 row 6)."""
    from medtransfer.hospital.sr_items import IMAGING_MEASUREMENTS

    for item in document.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == IMAGING_MEASUREMENTS.value:
            return item
    raise ValueError("the report has no Imaging Measurements container")


def write_classification_report(path: str | os.PathLike[str], identity, rows: Sequence[Mapping[str, str]],
                                model: ModelIdentity, sources: Mapping[str, Sequence[tuple[str, str, str]]],
                                per_series: bool) -> None:
    """:func:`classification_report` written to ``path`` atomically (the work of the report process)."""
    report = classification_report(identity, rows, model, sources, per_series)
    with atomic_path(path) as tmp:
        report.save_as(tmp, enforce_file_format=True)
