"""The demo generator's findings sidecar: where each opacity was drawn, beside an unchanged labels.csv."""
import csv

import pytest

from medtransfer.data.demo import demo_findings
from medtransfer.errors import DataError


def test_findings_list_exactly_the_positive_images(small_demo):
    with open(small_demo / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "label", "patient_id"]  # labels.csv keeps its columns
        rows = list(reader)
    findings = demo_findings(small_demo)
    assert set(findings) == {r["path"] for r in rows if r["label"] == "1"} and findings
    for f in findings.values():
        assert 0.15 < f["cx"] < 0.85 and 0.15 < f["cy"] < 0.85 and 0.035 <= f["radius"] <= 0.08


def test_a_folder_without_the_sidecar_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="medtransfer demo-data"):
        demo_findings(tmp_path)
