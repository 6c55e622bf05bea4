"""read_dicom on real files (pydicom's bundled test files, shared/data) with hand-computed values."""
from __future__ import annotations


import numpy as np
import pydicom
import pytest

from medtransfer.io import MedIOError, read_dicom
from medtransfer.io.dicom import decoder_for
from conftest import bundled, shared_data


def test_ct_pixel_in_hounsfield_units():
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ds.Rows, ds.Columns)
    expected = float(raw[64, 40]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = read_dicom(path)
    assert image.array.dtype == np.float32 and image.array.shape == (128, 128)
    assert image.array[64, 40] == pytest.approx(expected)
    assert image.meta["pixel_spacing"] == pytest.approx([0.661468, 0.661468])
    assert image.meta["value_range"] == [-32768 - 1024, 32767 - 1024]


def test_real_ct_slice_from_shared_data():
    path = shared_data() / "ct_liver_seg_dicom" / "ct" / "01.dcm"
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(512, 512)
    image = read_dicom(path)
    assert image.array[256, 256] == pytest.approx(raw[256, 256] * 1.0 - 1024.0)
    assert (image.meta["window_center"], image.meta["window_width"]) == (40.0, 400.0)
    windowed = read_dicom(path, voi="tags").array
    hu = float(image.array[256, 256])
    assert windowed[256, 256] == pytest.approx(np.clip((hu - (40 - 0.5 - 199.5)) / 399.0, 0, 1), abs=1e-6)


def test_named_window_preset():
    path = bundled("CT_small.dcm")
    hu = read_dicom(path).array
    lung = read_dicom(path, voi="lung").array  # (-600, 1500)
    lo = -600 - 0.5 - 1499 / 2
    assert lung[10, 10] == pytest.approx(np.clip((hu[10, 10] - lo) / 1499, 0, 1), abs=1e-6)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "rtdose.dcm", "image_dfl.dcm"]
)
def test_fast_native_path_matches_pydicom(name):
    path = bundled(name)
    ds = pydicom.dcmread(path)
    ref = ds.pixel_array.astype(np.float64)
    if "RescaleSlope" in ds:
        ref = ref * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "DoseGridScaling" in ds:  # RT dose has no modality LUT in the image module
        pass
    np.testing.assert_allclose(read_dicom(path).array, ref, rtol=1e-6)


def test_bits_stored_masked_and_sign_extended(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(64, 64).copy()
    raw[0, 0] = np.int16(0x0FFF | 0x7000)  # garbage in the high bits, stored value 0xFFF
    ds.PixelData = raw.tobytes()
    ds.BitsStored = 12
    ds.PixelRepresentation = 1
    ds.save_as(tmp_path / "signed.dcm")
    assert read_dicom(tmp_path / "signed.dcm").array[0, 0] == -1.0  # 12-bit two's complement 0xFFF
    ds.PixelRepresentation = 0
    raw[0, 0] = np.int16(0x7ABC)
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.save_as(tmp_path / "unsigned.dcm")
    assert read_dicom(tmp_path / "unsigned.dcm").array[0, 0] == float(0xABC)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(name):
    reference = read_dicom(bundled("MR_small.dcm")).array
    image = read_dicom(bundled(name))
    np.testing.assert_array_equal(image.array, reference)


def test_preferred_decoder_is_used_for_rle_and_j2k():
    assert decoder_for("1.2.840.10008.1.2.5")[0] == "pylibjpeg"
    assert decoder_for("1.2.840.10008.1.2.4.90")[0] == "pylibjpeg"
    assert decoder_for("1.2.840.10008.1.2.1") == ("", ())


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm"])
def test_colour_images_come_out_rgb(name):
    a = read_dicom(bundled(name)).array
    assert a.shape == (100, 100, 3)
    # pydicom's SC_rgb test pattern: red, light red, green, light green, blue, light blue bands
    for row, rgb in [(5, (255, 0, 0)), (15, (255, 128, 128)), (25, (0, 255, 0)), (45, (0, 0, 255))]:
        np.testing.assert_allclose(a[row, 50], rgb, atol=6)


def test_monochrome1_cr_is_inverted_with_its_window():
    path = shared_data() / "dicom_nifti_io_samples" / "pydicom" / "RG1_J2KI.dcm"
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    image = read_dicom(path)
    assert image.meta["inverted"] and image.meta["photometric_interpretation"] == "MONOCHROME1"
    top = 2**15 - 1  # BitsStored 15, unsigned
    assert image.array[1000, 900] == pytest.approx(top - float(raw[1000, 900]))
    # the centre that windows the inverted array like the file's window: lo + hi + 1 - c
    assert image.meta["window_center"] == pytest.approx(top + 1 - float(ds.WindowCenter))
    assert image.meta["pixel_spacing"] is None  # the file says 0\0, which is no spacing
    kept = read_dicom(path, invert_monochrome1=False)
    assert kept.array[1000, 900] == float(raw[1000, 900]) and not kept.meta["inverted"]


def test_synthetic_monochrome1_and_imager_pixel_spacing(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsStored = 12
    ds.WindowCenter, ds.WindowWidth = 1000, 500
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.143, 0.143]
    ds.save_as(tmp_path / "m1.dcm")
    raw = pydicom.dcmread(tmp_path / "m1.dcm").pixel_array
    image = read_dicom(tmp_path / "m1.dcm")  # signed 12 bit: range [-2048, 2047]
    assert image.array[3, 7] == pytest.approx(-2048 + 2047 - float(raw[3, 7]))
    assert image.meta["window_center"] == -1.0 + 1 - 1000
    assert image.meta["pixel_spacing"] == [0.143, 0.143] and image.meta["pixel_spacing_source"] == "ImagerPixelSpacing"


def test_enhanced_ct_shared_rescale_and_window():
    path = shared_data() / "dicom_nifti_io_samples" / "pydicom" / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    assert image.array.shape == (2, 512, 512)
    assert image.array[1, 200, 300] == pytest.approx(float(ds.pixel_array[1, 200, 300]) - 1024.0)
    assert (image.meta["window_center"], image.meta["window_width"]) == (49.0, 102.0)
    assert image.meta["pixel_spacing"] == pytest.approx([0.388672, 0.388672])
    assert np.asarray(image.meta["frame_positions"])[:, 2].tolist() == [-159.0, -149.0]


def test_per_frame_rescale(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(shared_data() / "dicom_nifti_io_samples" / "pydicom" / "eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    del shared.PixelValueTransformationSequence
    for i, (slope, intercept) in enumerate([(1.0, -1024.0), (2.0, -1000.0)]):
        item = Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "HU"
        ds.PerFrameFunctionalGroupsSequence[i].PixelValueTransformationSequence = Sequence([item])
    ds.save_as(tmp_path / "perframe.dcm")
    raw = ds.pixel_array
    image = read_dicom(tmp_path / "perframe.dcm")
    assert image.array[0, 100, 100] == pytest.approx(raw[0, 100, 100] - 1024.0)
    assert image.array[1, 100, 100] == pytest.approx(raw[1, 100, 100] * 2.0 - 1000.0)
    assert image.meta["rescale_slopes"] == [1.0, 2.0]


def test_undecodable_syntax_names_the_plugin():
    # JPEG Lossless SV1: no installed plugin (needs pylibjpeg-libjpeg or gdcm)
    with pytest.raises(MedIOError) as err:
        read_dicom(bundled("SC_rgb_jpeg_gdcm.dcm"))
    assert 'pip install "medtransfer[gdcm]" (python-gdcm, BSD-3-Clause)' in str(err.value)
    assert 'pip install "medtransfer[libjpeg]" (pylibjpeg-libjpeg, GPL-3.0' in str(err.value)
    assert "SC_rgb_jpeg_gdcm.dcm" in str(err.value)
    # 12-bit JPEG Extended: Pillow is installed but cannot decode it
    with pytest.raises(MedIOError) as err:
        read_dicom(bundled("JPGExtended.dcm"))
    assert "pylibjpeg-libjpeg" in err.value.reason


def test_invalid_number_of_frames_keeps_the_frames_the_data_holds(tmp_path):
    """badVR.dcm says NumberOfFrames "1A"; its 6000 bytes hold 15 frames of 10×10 at 32 bits (the frames of
    rtdose.dcm). All 15 are read and the metadata says why, instead of one frame read silently."""
    image = read_dicom(bundled("badVR.dcm"))
    assert image.array.shape == (15, 10, 10)
    np.testing.assert_array_equal(image.array, read_dicom(bundled("rtdose.dcm")).array)
    assert image.meta["frames"] == 15
    (problem,) = image.meta["problems"]
    assert problem["kind"] == "invalid_number_of_frames"
    assert "'1A'" in problem["message"] and "15 frame(s)" in problem["message"]
    assert "problems" not in read_dicom(bundled("rtdose.dcm")).meta or not read_dicom(bundled("rtdose.dcm")).meta["problems"]

    # data for 2.5 frames under an invalid count: the 2 whole frames are kept, and the rest is named
    ds = pydicom.dcmread(bundled("badVR.dcm"))
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(tmp_path / "partial.dcm")
    image = read_dicom(tmp_path / "partial.dcm")
    assert image.array.shape == (2, 10, 10)
    assert "200 byte(s) left over" in image.meta["problems"][0]["message"]


def test_inspect_reports_an_invalid_number_of_frames(tmp_path):
    import shutil

    from medtransfer.io import inventory

    shutil.copy(bundled("badVR.dcm"), tmp_path / "badVR.dcm")
    problems = inventory(tmp_path)["problems"]
    assert [p["kind"] for p in problems] == ["invalid_number_of_frames"]
    assert "'1A'" in problems[0]["message"] and "15 frame(s)" in problems[0]["message"]


def test_twelve_bit_jpeg_extended_message_names_syntax_depth_and_plugins():
    """Pillow cannot decode 12-bit JPEG Extended (DCMTK can): the message keeps Pillow's reason, names the
    syntax, the bit depth, the plugin tried and the ones that would work (GPL flagged), and does not call
    the stream corrupt or suggest Pillow again."""
    for name in ("JPGExtended.dcm", "JPEG-lossy.dcm"):
        with pytest.raises(MedIOError) as err:
            read_dicom(bundled(name))
        reason = err.value.reason
        assert "JPEG Extended (Process 2 and 4)" in reason and "1.2.840.10008.1.2.4.51" in reason
        assert "12-bit" in reason and "tried: pillow" in reason
        assert "Pillow does not support 'JPEG Extended' for samples with 12-bit precision" in reason
        assert 'pip install "medtransfer[gdcm]" (python-gdcm, BSD-3-Clause)' in reason
        assert "(pylibjpeg-libjpeg, GPL-3.0" in reason
        assert "corrupt" not in reason and "install Pillow" not in reason and "or Pillow" not in reason


def test_decoder_hints_put_permissive_plugins_first():
    from medtransfer.io.dicom import missing_decoder_hint

    baseline = missing_decoder_hint("1.2.840.10008.1.2.4.50")
    assert baseline.index("Pillow") < baseline.index("GPL") and not baseline.split("pip install ")[1].startswith("pylibjpeg-libjpeg")
    j2k = missing_decoder_hint("1.2.840.10008.1.2.4.90")
    assert "pylibjpeg-openjpeg" in j2k and "Pillow" in j2k
    lossless = missing_decoder_hint("1.2.840.10008.1.2.4.70")
    assert lossless.index("python-gdcm") < lossless.index("pylibjpeg-libjpeg, GPL-3.0")


def test_part10_instance_uid_reads_the_file_meta_like_pydicom():
    from pydicom.data import get_testdata_files

    from medtransfer.io.dicom import part10_instance_uid

    compared = 0
    for path in get_testdata_files("*.dcm"):
        data = open(path, "rb").read()
        if data[128:132] != b"DICM":
            assert part10_instance_uid(data) is None, path
            continue
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        expected = str(meta.get("MediaStorageSOPInstanceUID", "")) or None
        assert part10_instance_uid(data) == expected, path
        compared += 1
    assert compared > 50


@pytest.mark.parametrize("version", ["PYNETDICOM_304", "ODD_LEN"])
def test_part10_header_is_the_file_meta_pydicom_writes(version, tmp_path):
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from medtransfer.io.dicom import part10_header, part10_instance_uid

    for sop_class, sop, syntax in [("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", "1.2.840.10008.1.2.1"),
                                   ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.1", "1.2.840.10008.1.2")]:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = sop_class, sop, syntax
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.3811.3.0.4"  # odd length: padded
        meta.ImplementationVersionName = version
        expected = BytesIO()
        expected.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(expected, meta, enforce_standard=True)
        header = part10_header(sop_class, sop, syntax, "1.2.826.0.1.3680043.9.3811.3.0.4", version)
        assert header == expected.getvalue()
        assert part10_instance_uid(header) == sop
    raw = open(bundled("CT_small.dcm"), "rb").read()  # a whole file: header + the dataset's bytes as stored
    ct = pydicom.dcmread(bundled("CT_small.dcm"))
    dataset_bytes = raw[144 + int.from_bytes(raw[140:144], "little"):]  # after (0002,0000) and its group
    path = tmp_path / "ct.dcm"
    path.write_bytes(part10_header(ct.SOPClassUID, ct.SOPInstanceUID, ct.file_meta.TransferSyntaxUID, "1.2.3", version)
                     + dataset_bytes)
    back = pydicom.dcmread(path)
    assert back.file_meta.MediaStorageSOPInstanceUID == ct.SOPInstanceUID
    assert (back.pixel_array == ct.pixel_array).all()


def test_part10_instance_uid_is_none_for_bytes_that_do_not_carry_one():
    from medtransfer.io.dicom import part10_instance_uid

    data = open(bundled("CT_small.dcm"), "rb").read()
    uid = pydicom.dcmread(bundled("CT_small.dcm")).file_meta.MediaStorageSOPInstanceUID
    assert part10_instance_uid(data) == uid
    assert part10_instance_uid(memoryview(data)) == uid
    assert part10_instance_uid(data[:140]) is None  # file meta cut short
    assert part10_instance_uid(b"\x00" * 128 + b"DICM" + b"\x08\x00\x18\x00UI\x04\x001.2\x00") is None  # no meta group
    assert part10_instance_uid(data[128:]) is None  # no preamble
    assert part10_instance_uid(b"") is None
