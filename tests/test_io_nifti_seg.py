"""NIfTI (canonical RAS orientation, labels as integers) and DICOM SEG alignment on real files."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medtransfer.io import MedIOError, read_nifti, read_seg, read_series
from conftest import shared_data


def test_las_nifti_is_flipped_to_ras():
    path = shared_data() / "dicom_nifti_io_samples" / "nibabel" / "anatomical.nii"
    raw = nib.load(path)
    assert nib.aff2axcodes(raw.affine) == ("L", "A", "S")
    volume = read_nifti(path)
    assert volume.meta["original_orientation"] == "LAS" and volume.meta["orientation"] == "RAS"
    assert volume.array.shape == (33, 41, 25) and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((2.0, 2.0, 2.0))
    stored = np.asarray(raw.dataobj)
    assert volume.array[0, 7, 9] == stored[32, 7, 9]  # x reversed
    assert volume.affine[0, 0] == 2.0  # +i now points to the right
    kept = read_nifti(path, canonical=False)
    assert kept.array[0, 7, 9] == stored[0, 7, 9]


def test_4d_and_nifti2():
    base = shared_data() / "dicom_nifti_io_samples" / "nibabel"
    fmri = read_nifti(base / "functional.nii")
    assert fmri.array.shape == (17, 21, 3, 20) and fmri.spacing == pytest.approx((4.0, 4.0, 8.0))
    n2 = read_nifti(base / "example_nifti2.nii.gz")
    assert n2.meta["nifti_version"] == 2 and n2.array.shape == (32, 20, 12, 2)


def test_label_mask_is_integer(tmp_path):
    path = shared_data() / "msd_hippocampus" / "labelsTr" / "hippocampus_001.nii.gz"
    mask = read_nifti(path, label=True)
    assert mask.array.dtype == np.int16
    assert set(np.unique(mask.array).tolist()) == {0, 1, 2}
    expected = np.bincount(np.rint(np.asarray(nib.load(path).dataobj)).astype(int).ravel())
    assert np.bincount(mask.array.ravel()).tolist() == expected.tolist()
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.4, dtype=np.float32), np.eye(4)), tmp_path / "prob.nii.gz")
    with pytest.raises(MedIOError, match="non-integer"):
        read_nifti(tmp_path / "prob.nii.gz", label=True)


def test_seg_frames_land_on_their_source_slices():
    base = shared_data() / "ct_liver_seg_dicom"
    volume = read_series(base / "ct")
    seg = read_seg(base / "liver_seg.dcm", volume)
    assert seg.masks.shape == (1, 512, 512, 3) and seg.masks.dtype == np.uint8
    assert seg.segments[0]["label"] == "Liver" and seg.segments[0]["number"] == 1
    assert seg.meta["frames_placed_by_uid"] == 3 and seg.problems == []
    # SEG frame 1 → 03.dcm (z = -128.69), frame 2 → 02.dcm, frame 3 → 01.dcm
    per_slice = seg.masks[0].sum(axis=(0, 1)).tolist()
    assert per_slice == [36233, 35645, 35220]
    assert [Path(f).name for f in volume.meta["files"]] == ["03.dcm", "02.dcm", "01.dcm"]
    # pixel-level: frame 1 of the SEG (rows, cols) is the transposed plane k=0
    frames = pydicom.dcmread(base / "liver_seg.dcm").pixel_array
    np.testing.assert_array_equal(seg.masks[0, :, :, 0], frames[0].T)
    assert seg.label_map().sum() == 36233 + 35645 + 35220


def test_seg_placed_by_position_when_uids_do_not_match():
    base = shared_data() / "ct_liver_seg_dicom"
    volume = read_series(base / "ct")
    volume.meta["sop_instance_uids"] = ["x", "y", "z"]
    seg = read_seg(base / "liver_seg.dcm", volume)
    assert seg.meta["frames_placed_by_position"] == 3
    assert seg.masks[0].sum(axis=(0, 1)).tolist() == [36233, 35645, 35220]
