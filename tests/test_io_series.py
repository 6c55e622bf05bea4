"""Series → volume: grouping, slice order, geometry and the problems that are reported."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medtransfer.io import MedIOError, find_series, read_series
from conftest import shared_data


def write_series(folder: Path, zs, *, tilt_mm_per_slice: float = 0.0, sizes=None, orientations=None, order=None):
    """CT_small.dcm copies at ``z`` positions, each filled with its slice index (HU = index*10 - 1024)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    series_uid = generate_uid()
    paths = []
    for i, z in enumerate(zs):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = len(zs) - i if order is None else order[i]
        ds.ImagePositionPatient = [-158.0, -179.0 + i * tilt_mm_per_slice, float(z)]
        ds.ImageOrientationPatient = (orientations or {}).get(i, [1, 0, 0, 0, 1, 0])
        rows = (sizes or {}).get(i, 128)
        ds.Rows = rows
        ds.PixelData = np.full((rows, 128), i * 10, dtype="<i2").tobytes()
        path = folder / f"slice_{i:03d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def kinds(volume):
    return sorted(p.kind for p in volume.problems)


def test_study3_t1post_volume():
    folder = shared_data() / "brain_mr_dicom_studies" / "Study3" / "11-T1post-18670"
    volume = read_series(folder)
    assert volume.array.shape == (280, 320, 22)  # (columns, rows, slices)
    assert volume.spacing[0] == pytest.approx(0.6875) and volume.spacing[1] == pytest.approx(0.6875)
    assert volume.meta["slice_thickness"] == 5.0
    # slices are 6.5 mm apart (SpacingBetweenSlices) along the normal
    assert volume.spacing[2] == pytest.approx(6.5, abs=1e-3)
    assert volume.problems == []
    # ordered by position along the normal: InstanceNumber then runs monotonically
    numbers = [pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber for f in volume.meta["files"]]
    assert numbers == sorted(numbers) or numbers == sorted(numbers, reverse=True)
    assert np.all(np.diff(volume.meta["slice_positions"]) > 0)
    # the first listed file is not the first slice: order does not come from file names
    assert Path(volume.meta["files"][0]).name != "000000.dcm"


def test_study3_affine_from_the_tags():
    """Affine by hand from the first slice's tags (checked once against MONAI's PydicomReader)."""
    folder = shared_data() / "brain_mr_dicom_studies" / "Study3" / "11-T1post-18670"
    volume = read_series(folder)
    first = pydicom.dcmread(volume.meta["files"][0], stop_before_pixels=True)
    last = pydicom.dcmread(volume.meta["files"][-1], stop_before_pixels=True)
    row_dir = np.array(first.ImageOrientationPatient[:3], dtype=float)
    col_dir = np.array(first.ImageOrientationPatient[3:], dtype=float)
    flip = np.array([-1.0, -1.0, 1.0])  # LPS → RAS
    dy, dx = (float(v) for v in first.PixelSpacing)
    np.testing.assert_allclose(volume.affine[:3, 0], flip * row_dir * dx, atol=1e-9)
    np.testing.assert_allclose(volume.affine[:3, 1], flip * col_dir * dy, atol=1e-9)
    np.testing.assert_allclose(volume.affine[:3, 3], flip * np.array(first.ImagePositionPatient, dtype=float), atol=1e-9)
    step = (np.array(last.ImagePositionPatient, dtype=float) - np.array(first.ImagePositionPatient, dtype=float)) / 21
    np.testing.assert_allclose(volume.affine[:3, 2], flip * step, atol=1e-3)
    raw = pydicom.dcmread(volume.meta["files"][4]).pixel_array
    assert volume.array[17, 200, 4] == float(raw[200, 17])  # array[x=column, y=row, z=slice]


def test_folder_with_several_series_needs_a_uid():
    study = shared_data() / "brain_mr_dicom_studies" / "Study3"
    series, problems = find_series(study)
    assert sorted(len(s.paths) for s in series) == [22, 22, 22, 22, 40] and problems == []
    with pytest.raises(MedIOError, match="holds 5 series"):
        read_series(study)
    hippo = next(s for s in series if s.description == "HippoCrop")
    volume = read_series(study, series_uid=hippo.series_instance_uid)
    assert volume.array.shape == (34, 50, 40)  # 34 columns, 50 rows


def test_ct_series_ordered_by_position_and_metatensor():
    volume = read_series(shared_data() / "ct_liver_seg_dicom" / "ct")
    assert [Path(f).name for f in volume.meta["files"]] == ["03.dcm", "02.dcm", "01.dcm"]  # z ascending
    assert volume.meta["slice_positions"] == pytest.approx([-128.69, -127.69, -126.69])
    assert volume.spacing == pytest.approx((0.810547, 0.810547, 1.0), abs=1e-5)
    # RAS: DICOM LPS origin (-235.2, -226.8, -128.69) with x and y negated
    assert volume.origin == pytest.approx((235.199997, 226.800003, -128.690002))
    tensor = volume.to_metatensor()
    assert tuple(tensor.shape) == (1, 512, 512, 3)
    from monai.transforms import Orientation

    ras = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(tensor)
    assert np.asarray(ras.affine)[0, 0] == pytest.approx(0.810547, abs=1e-6)
    assert float(ras[0, 0, 0, 1]) == float(tensor[0, 511, 511, 1])


def test_enhanced_ct_single_file_volume():
    volume = read_series(shared_data() / "dicom_nifti_io_samples" / "pydicom" / "eCT_Supplemental.dcm")
    assert volume.array.shape == (512, 512, 2)
    assert volume.spacing == pytest.approx((0.388672, 0.388672, 10.0))


def test_shuffled_instance_numbers_do_not_change_order(tmp_path):
    write_series(tmp_path / "s", [0, 2.5, 5, 7.5], order=[3, 1, 4, 2])
    volume = read_series(tmp_path / "s")
    assert volume.array[0, 0, :].tolist() == [-1024.0, -1014.0, -1004.0, -994.0]
    assert volume.problems == []


def test_missing_slice_reported(tmp_path):
    paths = write_series(tmp_path / "s", [0, 2.5, 5, 10, 12.5])
    volume = read_series(tmp_path / "s")
    assert kinds(volume) == ["missing_slice"]
    problem = volume.problems[0]
    assert "about 1 slice(s) missing" in problem.message
    assert problem.paths == [str(paths[2]), str(paths[3])]
    assert volume.spacing[2] == pytest.approx(2.5)
    with pytest.raises(MedIOError, match="missing"):
        read_series(tmp_path / "s", strict=True)


def test_duplicate_slice_reported_and_dropped(tmp_path):
    paths = write_series(tmp_path / "s", [0, 2.5, 2.5, 5])
    volume = read_series(tmp_path / "s")
    assert kinds(volume) == ["duplicate_slice"]
    assert set(volume.problems[0].paths) == {str(paths[1]), str(paths[2])}
    assert volume.array.shape[2] == 3


def test_uneven_spacing_reported(tmp_path):
    write_series(tmp_path / "s", [0, 2.5, 5, 7.0, 9.5])
    volume = read_series(tmp_path / "s")
    assert kinds(volume) == ["uneven_spacing"]
    assert "2 to 2.5 mm" in volume.problems[0].message


def test_gantry_tilt_reported_and_kept_in_affine(tmp_path):
    # 2.5 mm along z and 0.5 mm along y per slice: tilt of atan(0.5/2.5) = 11.31°
    write_series(tmp_path / "s", [0, 2.5, 5, 7.5], tilt_mm_per_slice=0.5)
    volume = read_series(tmp_path / "s")
    assert kinds(volume) == ["gantry_tilt"]
    assert "11.31°" in volume.problems[0].message
    # third affine column (RAS) = LPS step (0, 0.5, 2.5) with y negated
    np.testing.assert_allclose(volume.affine[:3, 2], [0.0, -0.5, 2.5], atol=1e-9)


def test_mixed_sizes_and_orientations_reported(tmp_path):
    paths = write_series(
        tmp_path / "s", [0, 2.5, 5, 7.5, 10], sizes={4: 64}, orientations={0: [0, 1, 0, 0, 0, -1]}
    )
    volume = read_series(tmp_path / "s")
    assert kinds(volume) == ["mixed_orientation", "mixed_size"]
    by_kind = {p.kind: p for p in volume.problems}
    assert by_kind["mixed_size"].paths == [str(paths[4])]
    assert by_kind["mixed_orientation"].paths == [str(paths[0])]
    assert volume.array.shape == (128, 128, 3)


def test_broken_file_in_series_is_reported_and_skipped(tmp_path):
    paths = write_series(tmp_path / "s", [0, 2.5, 5])
    (tmp_path / "s" / "zero.dcm").write_bytes(b"")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-4000])  # pixel data cut short
    volume = read_series(tmp_path / "s")
    assert kinds(volume) == ["undecodable", "unreadable"]
    assert {p.paths[0] for p in volume.problems} == {str(tmp_path / "s" / "zero.dcm"), str(paths[2])}
    assert volume.array.shape[2] == 2


def test_direction_cosines_are_normalised_before_the_geometry(tmp_path):
    """ImageOrientationPatient written with rounding errors or scaled (|row| = 1.02, |col| = 0.98): the
    voxel sizes are the pixel spacing and the slice step is the distance along the unit normal."""
    write_series(tmp_path / "s", [0, 2.5, 5, 7.5], orientations={i: [1.02, 0, 0, 0, 0.98, 0] for i in range(4)})
    volume = read_series(tmp_path / "s")
    assert volume.problems == []
    spacing = float(pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False)).PixelSpacing[0])
    np.testing.assert_allclose(volume.affine[:3, 0], [-spacing, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(volume.affine[:3, 1], [0, -spacing, 0], rtol=1e-12)
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 2.5], atol=1e-12)
    assert volume.spacing == pytest.approx((spacing, spacing, 2.5), rel=1e-12)


def test_mr700_localizer_geometry_uses_unit_vectors():
    """pydicom's MR700 localizer stack (radial: seven orientations) keeps one slice; its cosines are off unit
    length by up to 2e-5, which leaked into the voxel sizes."""
    folder = Path(get_testdata_file("CT_small.dcm", download=False)).parent / "dicomdirtests" / "98892003" / "MR700"
    volume = read_series(folder)
    assert kinds(volume) == ["mixed_orientation"]
    first = pydicom.dcmread(volume.meta["files"][0], stop_before_pixels=True)
    row, col = (float(v) for v in first.PixelSpacing)
    assert np.linalg.norm(volume.affine[:3, 0]) == pytest.approx(col, rel=1e-12)
    assert np.linalg.norm(volume.affine[:3, 1]) == pytest.approx(row, rel=1e-12)
    assert np.linalg.norm(volume.affine[:3, 2]) == pytest.approx(float(first.SliceThickness), rel=1e-12)
