"""Batch inference at scale: every input accounted for, workers, resume, shards, 3D per series."""
import csv
import shutil
from pathlib import Path

import pytest
import torch

from conftest import shared_data
from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.config import load_config
from medtransfer.data.preprocess import PreprocessSpec
from medtransfer.inference import predict_folder
from medtransfer.inference.batch import SeriesFilter, parse_shard, shard_slice
from medtransfer.run import RunDirectory
from medtransfer.run.checkpoint import model_payload
from medtransfer.transfer import TransferModel


def make_run(path, backbone="tiny_cnn.random", dims=2, size=32, seed=0):
    """A run directory with an untrained tiny model (prediction plumbing only)."""
    torch.manual_seed(seed)
    cfg = load_config("xray", overrides=[f"model.backbone={backbone}", "model.weights=none", f"data.size={size}"])
    backbone_module, _ = load_backbone(get_weight_spec(backbone), 1, "none")
    model = TransferModel(backbone_module, 2)
    spec = PreprocessSpec(size, 1, "tags", (0.5, 99.5), (0.5,), (0.5,), dims)
    path.mkdir(parents=True)
    RunDirectory(path).save_model(model_payload(model, cfg.to_dict(), spec.to_dict(), ["negative", "positive"],
                                                backbone, operating_point={"threshold": 0.5}))
    return path


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny2d")


def test_every_file_once_with_workers(run2d, messy_folder, tmp_path):
    folder, _ = messy_folder
    a = predict_folder(run2d, folder, tmp_path / "a.csv", batch_size=3, workers=0)
    b = predict_folder(run2d, folder, tmp_path / "b.csv", batch_size=3, workers=2)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in _csv(tmp_path / "a.csv")) == files
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert a.counts == b.counts == {"ok": 3, "error": 3, "skipped": 2}
    assert not (tmp_path / "a.csv.partial").exists()


def test_resume_after_crash_equals_uninterrupted_run(run2d, small_demo, tmp_path):
    full = tmp_path / "full.csv"
    predict_folder(run2d, small_demo, full, batch_size=4)
    text = full.read_text()
    lines = text.splitlines(keepends=True)
    assert len(lines) - 1 == sum(1 for p in small_demo.rglob("*") if p.is_file())
    # A crash after 10 rows, in the middle of writing the 11th: the partial file has a torn line.
    out = tmp_path / "resumed.csv"
    partial = tmp_path / "resumed.csv.partial"
    partial.write_text("".join(lines[:11]) + lines[11][:25])
    summary = predict_folder(run2d, small_demo, out, batch_size=4, resume=True)
    assert out.read_text() == text
    assert not partial.exists()
    assert sum(summary.counts.values()) == len(lines) - 1
    # resuming a finished output does nothing new and changes nothing
    predict_folder(run2d, small_demo, out, batch_size=4, resume=True)
    assert out.read_text() == text


def test_shards_concatenate_to_the_full_run(run2d, small_demo, tmp_path):
    full = _csv(predict_folder(run2d, small_demo, tmp_path / "full.csv").out_csv)
    parts = []
    for i in range(3):
        parts += _csv(predict_folder(run2d, small_demo, tmp_path / f"s{i}.csv", shard=(i, 3)).out_csv)
    assert parts == full
    assert shard_slice(list(range(10)), (2, 3)) == [6, 7, 8, 9]
    assert parse_shard("1/4") == (1, 4)
    with pytest.raises(Exception, match="0 <= i < n"):
        parse_shard("4/4")


def test_selection_skips_with_a_reason(run2d, small_demo, tmp_path):
    s = predict_folder(run2d, small_demo / "images", tmp_path / "p.csv", series_filter=SeriesFilter(("CT",)))
    rows = _csv(s.out_csv)
    assert s.counts == {"skipped": len(rows)}
    assert all("modality" in r["reason"] and "not selected" in r["reason"] for r in rows)


def _with_clutter(folder, dicoms):
    """A DICOM-CD-like folder: the images, plus what such folders also hold."""
    for i, f in enumerate(dicoms):
        (folder / "IMAGES").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, folder / "IMAGES" / f"IM{i:04d}")
        (folder / "IMAGES" / f"._IM{i:04d}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS AppleDouble
    (folder / ".DS_Store").write_bytes(bytes(64))
    (folder / "README.TXT").write_text("Patient CD. Open VIEWER/viewer.exe to view the images.\n")
    (folder / "VIEWER").mkdir()
    (folder / "VIEWER" / "viewer.exe").write_bytes(b"MZ" + bytes(500))
    (folder / ".snapshot" / "hourly.0").mkdir(parents=True)  # a filer's snapshot copy: not entered
    shutil.copy(dicoms[0], folder / ".snapshot" / "hourly.0" / "IM0000")


def test_clutter_in_a_dicom_folder_is_skipped_not_an_error(run2d, small_demo, tmp_path):
    dicoms = sorted((small_demo / "images").rglob("*.dcm"))[:4]
    _with_clutter(tmp_path / "cd", dicoms)
    s = predict_folder(run2d, tmp_path / "cd", tmp_path / "cd.csv")
    rows = {Path(r["path"]).relative_to(tmp_path / "cd").as_posix(): r for r in _csv(s.out_csv)}
    assert s.counts == {"ok": 4, "skipped": 7}  # 4 AppleDouble + .DS_Store + README + viewer
    assert not any(k.startswith(".snapshot") for k in rows)
    assert rows["IMAGES/._IM0000"]["reason"].startswith("hidden file")
    assert rows["VIEWER/viewer.exe"]["reason"].startswith("not a DICOM file")


def test_clutter_beside_a_series_with_a_3d_model(tmp_path):
    series = sorted((shared_data("brain_mr_dicom_studies") / "Study1" / "13_HCropVolume").iterdir())
    _with_clutter(tmp_path / "cd", series)
    run3d = make_run(tmp_path / "tiny3d", backbone="tiny_cnn3d.random", dims=3, size=16)
    s = predict_folder(run3d, tmp_path / "cd", tmp_path / "cd.csv")
    rows = _csv(s.out_csv)
    assert s.counts == {"ok": 1, "skipped": len(series) + 3}
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok[0]["files"].split(";")) == len(series) == 32
    assert not any(".snapshot" in r["path"] for r in rows)


def test_3d_model_predicts_per_series(tmp_path):
    studies = shared_data("brain_mr_dicom_studies")
    run3d = make_run(tmp_path / "tiny3d", backbone="tiny_cnn3d.random", dims=3, size=16)
    s = predict_folder(run3d, studies, tmp_path / "series.csv", batch_size=2, workers=2)
    rows = _csv(s.out_csv)
    assert s.counts == {"ok": 7}
    n_files = sorted(len(r["files"].split(";")) for r in rows)
    assert n_files == [22, 22, 22, 22, 32, 35, 40]
    assert sum(n_files) == sum(1 for p in studies.rglob("*") if p.is_file())
    assert all(r["series_instance_uid"] and r["prob_positive"] for r in rows)
    # selection by series description and minimum slices
    s2 = predict_folder(run3d, studies, tmp_path / "hippo.csv",
                        series_filter=SeriesFilter(description="hippo", min_slices=33))
    kept = sorted(len(r["files"].split(";")) for r in _csv(s2.out_csv) if r["status"] == "ok")
    assert kept == [35, 40]


def test_study_json_per_study_matches_the_table(run2d, small_demo, tmp_path):
    import json

    jdir = tmp_path / "studies"
    s = predict_folder(run2d, small_demo / "images", tmp_path / "p.csv", study_json_dir=jdir)
    rows = _csv(s.out_csv)
    by_study = {}
    for r in rows:
        by_study.setdefault(r["study_instance_uid"], []).append(r)
    docs = {p.name: json.loads(p.read_text()) for p in jdir.glob("*.json")}
    assert sorted(docs) == sorted(f"{uid}.json" for uid in by_study)  # one file per study, nothing else
    for uid, study_rows in by_study.items():
        doc = docs[f"{uid}.json"]
        assert doc["format"] == "medtransfer-study/1" and doc["study_instance_uid"] == uid
        assert [i["path"] for i in doc["items"]] == [r["path"] for r in study_rows]
        assert doc["counts"] == {"ok": len(study_rows)}
        for item, r in zip(doc["items"], study_rows):
            assert item["probabilities"]["positive"] == pytest.approx(float(r["prob_positive"]))
            assert item["predicted"] == r["predicted"]
        peak = doc["summary"]["max_probability"]["positive"]
        assert peak["probability"] == pytest.approx(max(float(r["prob_positive"]) for r in study_rows))
        assert doc["model"]["label_names"] == ["negative", "positive"]
        assert doc["model"]["operating_point"] == {"threshold": 0.5}
    # rows that have no study (a broken file) are kept too, in their own file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "junk.dcm").write_bytes(b"not dicom")
    predict_folder(run2d, broken, tmp_path / "b.csv", study_json_dir=tmp_path / "bj", shard=(0, 1))
    doc = json.loads((tmp_path / "bj" / "no-study-uid.shard-0-of-1.json").read_text())
    assert doc["counts"] == {"error": 1} and doc["summary"]["n_predicted"] == 0  # named .dcm, not DICOM


def test_parquet_has_the_same_rows_as_the_csv(run2d, small_demo, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is in the dev extra; pip install pyarrow")
    s = predict_folder(run2d, small_demo / "images", tmp_path / "p.csv", parquet=True)
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    rows = _csv(s.out_csv)
    assert len(table) == len(rows) > 0
    assert [t["path"] for t in table] == [r["path"] for r in rows]
    assert [t["prob_positive"] for t in table] == pytest.approx([float(r["prob_positive"]) for r in rows])


def test_patient_fields_only_on_request(run2d, small_demo, tmp_path):
    import pydicom

    plain = predict_folder(run2d, small_demo / "images", tmp_path / "plain.csv")
    text = plain.out_csv.read_text()
    assert "patient_name" not in text and "SYNTHETIC^DEMO" not in text and "19700101" not in text
    rows = _csv(predict_folder(run2d, small_demo / "images", tmp_path / "phi.csv", patient_fields=True).out_csv)
    for r in rows[:5]:
        ds = pydicom.dcmread(r["path"], stop_before_pixels=True)
        assert (r["patient_id"], r["patient_name"], r["patient_birth_date"]) == (
            ds.PatientID, str(ds.PatientName), ds.PatientBirthDate)


def test_cli_predict_writes_table_study_json_and_exit_codes(run2d, small_demo, tmp_path):
    from typer.testing import CliRunner

    from medtransfer.cli.main import app

    runner = CliRunner()
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(run2d), str(small_demo / "images"), "--out", str(out), "-q",
                              "--study-json", str(tmp_path / "studies"), "--patient-fields"])
    assert res.exit_code == 0, res.output
    rows = _csv(out)
    assert rows and all(r["patient_id"] for r in rows)
    assert len(list((tmp_path / "studies").glob("*.json"))) == len({r["study_instance_uid"] for r in rows})
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    res = runner.invoke(app, ["predict", str(run2d), str(empty), "--out", str(tmp_path / "e.csv"), "-q"])
    assert res.exit_code == 1  # nothing could be predicted: scripts must see a failure
    assert _csv(tmp_path / "e.csv")[0]["status"] == "skipped"
