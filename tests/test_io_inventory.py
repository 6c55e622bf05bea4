"""inventory() on real folders and broken files, and the `inspect` command through CliRunner."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import typer
from typer.testing import CliRunner

from medtransfer.cli.inspect_cmd import inspect_command
from medtransfer.io import inventory, render_inventory
from conftest import bundled, shared_data


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Two CT series (one with a duplicate slice), an SR, an RTSTRUCT, and every broken-file kind."""
    root = tmp_path / "export"
    (root / "ct").mkdir(parents=True)
    for name in ("01.dcm", "02.dcm", "03.dcm"):
        shutil.copy(shared_data() / "ct_liver_seg_dicom" / "ct" / name, root / "ct" / name)
    shutil.copy(shared_data() / "ct_liver_seg_dicom" / "ct" / "02.dcm", root / "ct" / "02_copy.dcm")
    ds = pydicom.dcmread(root / "ct" / "02_copy.dcm")
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(root / "ct" / "02_copy.dcm")
    shutil.copy(shared_data() / "ct_liver_seg_dicom" / "liver_seg.dcm", root / "seg.dcm")
    shutil.copy(bundled("test-SR.dcm"), root / "report.dcm")
    shutil.copy(bundled("rtstruct.dcm"), root / "rtstruct.dcm")
    shutil.copy(bundled("SC_rgb_jpeg_gdcm.dcm"), root / "jpeg_lossless.dcm")
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    data = open(bundled("CT_small.dcm"), "rb").read()
    (root / "cut.dcm").write_bytes(data[: len(data) - 5000])
    return root


def test_brain_mr_studies():
    inv = inventory(shared_data() / "brain_mr_dicom_studies")
    c = inv["counts"]
    assert (c["files"], c["patients"], c["studies"], c["series"], c["problems"]) == (195, 3, 3, 7, 0)
    t1 = next(s for s in inv["series"] if s["description"] == "T1post")
    assert t1["slices"] == 22 and t1["size"] == [320, 280] and t1["modality"] == "MR"
    assert t1["spacing"] == pytest.approx([0.6875, 0.6875, 6.5], abs=1e-3)
    assert t1["slice_thickness"] == 5.0
    assert t1["transfer_syntax"] == "1.2.840.10008.1.2.1" and t1["photometric_interpretation"] == "MONOCHROME2"
    json.dumps(inv)  # serialisable


def test_messy_folder_reports_every_problem(messy_folder: Path):
    inv = inventory(messy_folder)
    by_kind = {p["kind"]: p for p in inv["problems"]}
    assert inv["counts"]["problems_by_kind"] == {
        "unreadable": 1, "not_dicom": 1, "undecodable": 1, "duplicate_slice": 1,
    }
    assert by_kind["unreadable"]["path"] == str(messy_folder / "empty.dcm")
    assert by_kind["not_dicom"]["path"] == str(messy_folder / "notes.txt")
    assert by_kind["undecodable"]["path"] == str(messy_folder / "jpeg_lossless.dcm")
    assert "pylibjpeg-libjpeg" in by_kind["undecodable"]["message"]
    assert set(by_kind["duplicate_slice"]["paths"]) == {str(messy_folder / "ct" / "02.dcm"), str(messy_folder / "ct" / "02_copy.dcm")}
    assert inv["counts"]["non_image_by_kind"] == {"SEG": 1, "SR": 1, "RTSTRUCT": 1}
    # the truncated CT's header parses: only the decode check finds it
    assert not any(p["path"].endswith("cut.dcm") for p in inv["problems"])
    checked = inventory(messy_folder, decode_check=True)
    cut = [p for p in checked["problems"] if p["path"].endswith("cut.dcm")]
    assert len(cut) == 1 and cut[0]["kind"] == "undecodable" and "truncated" in cut[0]["message"]


def test_no_patient_names_or_birth_dates(messy_folder: Path):
    names = set()
    for path in messy_folder.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for kw in ("PatientName", "PatientBirthDate"):
            if ds.get(kw):
                names.add(str(ds.get(kw)))
    assert names
    inv = inventory(messy_folder, decode_check=True)
    text = json.dumps(inv) + render_inventory(inv)
    assert not [n for n in names if n in text]


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """medtransfer (test stand-in)."""

    app.command("inspect")(inspect_command)
    return app


def test_inspect_cli_text_and_json(messy_folder: Path):
    runner = CliRunner()
    result = runner.invoke(_app(), ["inspect", str(messy_folder)])
    assert result.exit_code == 0, result.output
    assert "3 series" in result.output and "duplicate_slice" in result.output
    assert str(messy_folder / "empty.dcm") in result.output
    result = runner.invoke(_app(), ["inspect", str(messy_folder), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["counts"]["series"] == 3 and data["counts"]["non_image"] == 3


def test_inspect_cli_exit_codes_and_help(tmp_path: Path):
    runner = CliRunner()
    missing = runner.invoke(_app(), ["inspect", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(_app(), ["inspect", str(tmp_path / "empty")])
    assert empty.exit_code == 1 and "holds no files" in empty.output
    help_text = " ".join(runner.invoke(_app(), ["inspect", "--help"], terminal_width=200).output.split())
    assert "--json" in help_text and "--decode" in help_text
    assert "List the patients, studies and series in a DICOM folder" in help_text
