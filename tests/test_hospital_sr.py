"""The SR writer against highdicom: every measurement group written by ``sr_items`` equals the one
highdicom builds from the same content, and so does the whole report."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from medtransfer.hospital.sr import (
    ModelIdentity,
    classification_report,
    highdicom_group,
    identity_of,
    plain_dataset,
    report_groups,
    sr_document,
    stable_uid,
)
from medtransfer.hospital.sr_items import measurement_group

MR = "1.2.840.10008.5.1.4.1.1.4"
CREATION = ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime")


def _model(n_classes: int) -> ModelIdentity:
    names = ("negative", "positive") if n_classes == 2 else tuple(f"grade {i}" for i in range(n_classes))
    return ModelIdentity("run-7", "medtransfer 0.1.0", "ab" * 32, "efficientnet_lite0.in1k", names,
                         "p(positive)>=0.4321", binary=n_classes == 2)


def _study(model: ModelIdentity, n_images: int, seed: int = 0):
    """An identity, ``n_images`` ok rows with awkward probabilities (more digits than DS holds, 0, 1)
    and each row's source instance."""
    import numpy as np

    rng = np.random.default_rng(seed)
    header = Dataset()
    header.PatientName, header.PatientID, header.StudyInstanceUID = "Doe^Jane", "P-17", "1.2.826.0.1.99.1"
    header.StudyDate, header.AccessionNumber = "20240102", "ACC9"
    rows, sources = [], {}
    for i in range(n_images):
        probs = rng.dirichlet(np.ones(len(model.label_names)))
        if i == 1:
            probs = np.eye(len(model.label_names))[0]  # exactly 1 and 0
        path = f"studies/1.2.826.0.1.99.1/series/1.2.826.0.1.99.2/instances/1.2.826.0.1.99.3.{i}"
        row = {"path": path, "status": "ok", "series_instance_uid": "1.2.826.0.1.99.2",
               "predicted": model.label_names[int(np.argmax(probs))]}
        row.update({f"prob_{n}": repr(float(p)) for n, p in zip(model.label_names, probs)})
        rows.append(row)
        sources[path] = [("1.2.826.0.1.99.2", MR, f"1.2.826.0.1.99.3.{i}")]
    return identity_of(header), rows, sources


def _without_creation_time(ds: Dataset) -> Dataset:
    for keyword in CREATION:
        if keyword in ds:
            delattr(ds, keyword)
    for item in ds.get("ContributingEquipmentSequence", []):
        del item.ContributionDateTime
    return ds


@pytest.mark.parametrize("n_classes", [2, 3])
def test_every_group_equals_highdicoms(n_classes):
    model = _model(n_classes)
    identity, rows, sources = _study(model, 6)
    groups = report_groups(model, rows, sources, per_series=False, scope=str(identity.StudyInstanceUID))
    assert len(groups) == 7  # the study, then each image
    assert groups[0].derivation is not None and groups[0].algorithm_parameters  # study: max, parameters once
    assert not any(g.algorithm_parameters for g in groups[1:]) and all(g.sources for g in groups[1:])
    for group in groups:
        reference = plain_dataset(highdicom_group(group)[0])
        ours = measurement_group(group)
        assert ours == reference  # the same attributes, values and VRs, items in the same order (deep)


def test_report_equals_the_one_highdicom_builds_alone(tmp_path):
    import highdicom as hd

    model = _model(2)
    identity, rows, sources = _study(model, 5)
    ours = classification_report(identity, rows, model, sources, per_series=False)
    study = str(identity.StudyInstanceUID)
    groups = report_groups(model, rows, sources, per_series=False, scope=study)
    refs = [ref for r in rows for ref in sources[r["path"]]]
    keys = sorted(r["path"] for r in rows)
    reference = sr_document(identity, model, [highdicom_group(g) for g in groups], refs, study,
                            stable_uid(model.sha256, study, "sr", *keys))
    assert _without_creation_time(ours) == _without_creation_time(plain_dataset(reference))
    path = tmp_path / "sr.dcm"
    ours.save_as(path, enforce_file_format=True)
    back = hd.sr.srread(path)  # highdicom reads it back as its own TID 1500 report
    report = back.content[0]
    assert isinstance(back, hd.sr.ComprehensiveSR) and report.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    measured = hd.sr.utils.find_content_items(back, value_type=hd.sr.ValueTypeValues.NUM, recursive=True)
    assert len(measured) == 2 * 6  # two classes in the study group and in each of 5 image groups
    back_rows = [float(r["prob_positive"]) for r in rows]
    image_values = [float(m.MeasuredValueSequence[0].FloatingPointValue) for m in measured[2:]][1::2]
    assert image_values == back_rows  # FD keeps every digit of the probability


def test_single_image_report_is_highdicoms_own():
    model = _model(2)
    identity, rows, sources = _study(model, 1)
    ours = classification_report(identity, rows, model, sources, per_series=False)
    measurements = [i for i in ours.ContentSequence if i.ValueType == "CONTAINER"][0]
    assert len(measurements.ContentSequence) == 1  # one image, no study group
    assert pydicom.dataset.Dataset is type(ours)
