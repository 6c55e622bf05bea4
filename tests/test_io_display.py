"""The grayscale display pipeline of read_dicom: Modality LUT → VOI (window or VOI LUT) → MONOCHROME1
inversion (PS3.4 N.2), checked with values computed by hand from the stored pixels and the tags.

The window is always given in modality units, whatever the photometric interpretation; the inversion of a
MONOCHROME1 image comes after it. The same files are compared with DCMTK in test_conformance_dcmtk.py.
"""
from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest

from medtransfer.io import apply_window, read_dicom
from conftest import bundled, shared_data

CR = "dicomdirtests/77654033/CR1/6154"  # MONOCHROME1, 12 bit, slope 0.684, intercept 200, window 1600/2800


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out, in float64, on [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def cr_modality(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("voi", [(1600.0, 2800.0), (1500.0, 300.0), "bone"])
def test_monochrome1_explicit_window_is_in_modality_units(voi):
    """An explicit or named window on a MONOCHROME1 image is applied to the modality values, then the
    result is inverted (DCMTK ``+Ww c w``); it used to be applied to the already inverted values."""
    path = bundled(CR)
    modality = cr_modality(path)
    center, width = (400.0, 1800.0) if voi == "bone" else voi
    expected = 1.0 - linear_window(modality, center, width)
    image = read_dicom(path, voi=voi)
    assert image.meta["inverted"]
    np.testing.assert_allclose(image.array, expected, atol=2e-6)


def test_monochrome1_window_tags_mirror_exactly(tmp_path):
    """voi="tags" on MONOCHROME1: 1 - window(modality); the mirrored centre kept in the metadata (for the
    inverted array) is lo + hi + 1 - center. Width 10 shows the 1/(width - 1) offset the missing +1 made."""
    ds = pydicom.dcmread(bundled(CR))
    center = round(float(np.median(cr_modality(bundled(CR)))))
    ds.WindowCenter, ds.WindowWidth = center, 50
    ds.save_as(tmp_path / "narrow.dcm")
    modality = cr_modality(tmp_path / "narrow.dcm")
    image = read_dicom(tmp_path / "narrow.dcm", voi="tags")
    assert ((image.array > 0) & (image.array < 1)).sum() > 10  # pixels inside the window, where the offset shows
    np.testing.assert_allclose(image.array, 1.0 - linear_window(modality, center, 50), atol=2e-6)
    physical = read_dicom(tmp_path / "narrow.dcm")
    lo, hi = physical.meta["value_range"]
    assert physical.meta["window_center"] == pytest.approx(lo + hi + 1 - center)
    # the mirrored window on the inverted physical array gives the same display
    np.testing.assert_allclose(apply_window(physical.array, physical.meta["window_center"], 50), image.array, atol=2e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_width_one_is_a_step_not_nan(tmp_path, photometric):
    """Width 1 is legal DICOM: values ≤ center - 0.5 are black, the others white (before inversion); the
    pixels exactly at the threshold were 0/0 = NaN."""
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.PhotometricInterpretation = photometric
    ds.save_as(tmp_path / "w1.dcm")
    stored = ds.pixel_array.astype(np.float64)
    center = float(np.round(np.median(stored))) + 0.5  # the threshold center - 0.5 falls on a stored value
    out = read_dicom(tmp_path / "w1.dcm", voi=(center, 1)).array
    assert not np.isnan(out).any()
    assert (stored == center - 0.5).any()
    step = (stored > center - 0.5).astype(np.float64)
    np.testing.assert_array_equal(out, step if photometric == "MONOCHROME2" else 1.0 - step)
    assert 0 < step.mean() < 1
    np.testing.assert_array_equal(apply_window(np.array([9.0, 9.4, 9.6, 11.0]), 10.0, 1.0), [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("name,top", [("SC_rgb_rle.dcm", 255.0), ("SC_rgb_rle_16bit.dcm", 65535.0), ("US1_UNCR.dcm", 255.0)])
def test_colour_with_voi_is_unit_range_and_says_voi_does_not_apply(name, top):
    """VOI is a grayscale transformation (PS3.4 N.2): a colour image asked for a window comes back as its
    colour values on [0, 1], with a warning and ``voi_applied`` saying the window was not applied."""
    path = shared_data("dicom_nifti_io_samples", "pydicom", name) if name.startswith("US1") else bundled(name)
    raw = read_dicom(path).array
    for voi in ("tags", (40.0, 400.0), "lung"):
        with pytest.warns(UserWarning, match="VOI .*does not apply to colour"):
            image = read_dicom(path, voi=voi)
        assert image.array.dtype == np.float32 and image.array.max() <= 1.0
        np.testing.assert_allclose(image.array, raw / top, atol=1e-7)
        assert image.meta["voi_applied"].startswith("none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_dicom(path).array.max() > 1  # no VOI asked: colour values as stored, no warning
