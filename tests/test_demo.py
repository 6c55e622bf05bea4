import csv

import numpy as np
import pydicom
import pytest

from medtransfer.io import read_dicom


def _rows(root):
    with open(root / "labels.csv") as fh:
        return list(csv.DictReader(fh))


def test_demo_files_are_valid_dicom_with_radiography_tags(small_demo):
    rows = _rows(small_demo)
    assert len(rows) >= 36  # 12 patients × 3–4 images
    photometrics, bits = set(), set()
    for row in rows:
        ds = pydicom.dcmread(small_demo / row["path"])
        assert ds.Modality in {"DX", "CR"}
        assert ds.PatientID == row["patient_id"]
        assert 12 <= ds.BitsStored <= 16 and ds.BitsAllocated == 16
        assert "RescaleSlope" in ds and "RescaleIntercept" in ds
        assert "WindowCenter" in ds and "WindowWidth" in ds
        assert ds.pixel_array.shape == (128, 128)
        assert int(ds.pixel_array.max()) <= 2**ds.BitsStored - 1
        photometrics.add(ds.PhotometricInterpretation)
        bits.add(int(ds.BitsStored))
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert len(bits) >= 2
    labels = [int(r["label"]) for r in rows]
    assert 0.2 < np.mean(labels) < 0.8
    # several images per patient
    assert len({r["patient_id"] for r in rows}) == 12


def test_monochrome1_is_inverted_to_higher_is_brighter(small_demo):
    rows = _rows(small_demo)
    checked = 0
    for row in rows:
        path = small_demo / row["path"]
        ds = pydicom.dcmread(path)
        img = read_dicom(path)
        stored = ds.pixel_array.astype(np.float64)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            lo, hi = sorted((0 * slope + intercept, (2**ds.BitsStored - 1) * slope + intercept))
            expected = lo + hi - (stored[64, 64] * slope + intercept)
            assert img.meta["inverted"] is True
            checked += 1
        else:
            expected = stored[64, 64] * slope + intercept
            assert img.meta["inverted"] is False
        assert img.array[64, 64] == pytest.approx(expected)
        # Anatomy check independent of encoding: the spine/mediastinum column is brighter than the
        # air outside the body, for MONOCHROME1 and MONOCHROME2 alike.
        windowed = read_dicom(path, voi="tags").array
        assert windowed[40:90, 60:68].mean() > windowed[5:15, 5:15].mean() + 0.3
    assert checked > 0
