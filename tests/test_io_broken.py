"""Every kind of broken input raises MedIOError naming the file and the cause."""
from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from medtransfer.io import MedIOError, NoPixelDataError, read_dicom, read_nifti
from medtransfer.io.dicom import UndecodablePixelDataError
from conftest import bundled, shared_data


def _expect(path, *words, cls=MedIOError):
    with pytest.raises(cls) as err:
        read_dicom(path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in err.value.reason, err.value.reason
    return err.value


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.dcm").write_bytes(b"")
    _expect(tmp_path / "empty.dcm", "empty file")


def test_missing_file(tmp_path):
    _expect(tmp_path / "nope.dcm", "cannot open")


def test_not_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("patient list\n" * 50)
    _expect(tmp_path / "notes.txt", "not a DICOM file")


def test_text_file_rejected_without_pydicom_warnings(tmp_path, recwarn):
    """A README beside the images must not print pydicom's VR guesses during a folder scan."""
    (tmp_path / "README.txt").write_text("SYNTHETIC chest-radiograph-like DICOM images (demo data).\nSee labels.csv.\n")
    _expect(tmp_path / "README.txt", "not a DICOM file")
    assert not [w for w in recwarn if "VR" in str(w.message)], [str(w.message) for w in recwarn]


def test_truncated_in_header(tmp_path):
    data = open(bundled("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[:700])
    err = _expect(tmp_path / "cut.dcm")
    assert "truncated" in err.reason or "not a DICOM" in err.reason


def test_truncated_in_pixel_data(tmp_path):
    data = open(bundled("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 5000])
    _expect(tmp_path / "cut.dcm", "truncated", cls=UndecodablePixelDataError)


def test_no_pixel_data_is_its_own_error(tmp_path):
    err = _expect(bundled("rtstruct.dcm"), "no image", cls=NoPixelDataError)
    assert "RT Structure Set" in err.reason


def test_pixel_data_of_the_wrong_length(tmp_path):
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    ds.Rows = 256  # the data holds 128 rows
    ds.save_as(tmp_path / "short.dcm")
    err = _expect(tmp_path / "short.dcm", "32768 bytes", "65536", cls=UndecodablePixelDataError)
    assert "Rows/Columns" in err.reason


def test_unsupported_syntax_names_plugin():
    _expect(bundled("SC_rgb_jpeg_gdcm.dcm"), 'pip install "medtransfer[gdcm]"', "pylibjpeg-libjpeg, GPL-3.0",
            cls=UndecodablePixelDataError)


def test_corrupt_compressed_stream(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small_jp2klossless.dcm"))
    data = bytearray(ds.PixelData)
    start = len(data) // 3
    data[start : start + 200] = b"\xff" * 200
    ds.PixelData = bytes(data)
    ds.save_as(tmp_path / "corrupt.dcm")
    try:
        image = read_dicom(tmp_path / "corrupt.dcm")
    except UndecodablePixelDataError as err:
        assert "JPEG 2000" in err.reason and "corrupt" in err.reason
    else:  # some codecs decode garbage without complaint; then the pixels must differ
        assert not np.array_equal(image.array, read_dicom(bundled("MR_small.dcm")).array)

    rle = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    rle.PixelData = rle.PixelData[:200]  # frame cut short: header offsets point past the end
    rle.save_as(tmp_path / "rle_cut.dcm")
    _expect(tmp_path / "rle_cut.dcm", "RLE", cls=UndecodablePixelDataError)


def test_bad_nifti(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(MedIOError, match="empty file"):
        read_nifti(tmp_path / "empty.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 100)
    with pytest.raises(MedIOError, match="not a readable NIfTI"):
        read_nifti(tmp_path / "junk.nii")
    src = bundled("CT_small.dcm")
    shutil.copy(src, tmp_path / "ct.nii")
    with pytest.raises(MedIOError):
        read_nifti(tmp_path / "ct.nii")


def test_dicomdir_is_named_not_an_unknown_sop_class(tmp_path):
    """A DICOMDIR carries its SOP class only in the file meta; skipping it should say what it is."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.FileSetID = "CD1"
    ds.DirectoryRecordSequence = []
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    err = _expect(tmp_path / "DICOMDIR", "DICOMDIR", "Media Storage Directory", cls=NoPixelDataError)
    assert "unknown" not in err.reason


def test_truncated_pixel_data_of_a_large_file(tmp_path):
    """Files over 1 MiB are read with the pixel data mapped from the file: one cut short says so instead of
    mapping past its end."""
    data = (shared_data() / "dicom_nifti_io_samples" / "pydicom" / "MR2_UNCR.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-1000])
    err = _expect(tmp_path / "cut.dcm", "cut short", "2096290 of 2097152 bytes", cls=UndecodablePixelDataError)
    assert "truncated" in err.reason
    whole = read_dicom(shared_data() / "dicom_nifti_io_samples" / "pydicom" / "MR2_UNCR.dcm").array
    assert whole.flags.writeable and whole.flags.owndata  # a new array, not a view of the mapping
