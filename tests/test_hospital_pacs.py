"""PACS to PACS against a real Orthanc: query + retrieve + predict over DICOMweb and DIMSE give the
rows of a folder run; SR and SEG go back and are found by QIDO-RS and C-FIND; resume after a kill;
a PACS that goes away or hangs gives error rows, never a hang."""
import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
import torch
from typer.testing import CliRunner

from conftest import shared_data
from orthanc_server import OrthancServer, find_orthanc, free_port

pytest.importorskip("pynetdicom", reason="needs the pacs extra: pip install 'medtransfer[pacs]'")
pytest.importorskip("dicomweb_client", reason="needs the pacs extra: pip install 'medtransfer[pacs]'")
if find_orthanc()[0] is None:
    pytest.skip(find_orthanc()[2], allow_module_level=True)

from medtransfer.cli.main import app  # noqa: E402
from medtransfer.hospital import ConnectionSettings  # noqa: E402
from medtransfer.inference import predict_folder  # noqa: E402
from medtransfer.inference.batch import SeriesFilter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MOVE_PORT = free_port()


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _by_sop(rows):
    return {r["sop_instance_uid"]: r for r in rows}


def _agree(pacs_row, folder_row) -> bool:
    """A PACS row says what the folder row says about the same instance: everything but the path,
    probabilities to 1e-6 (chunks batch the images differently: the last printed digit may move)."""
    if set(pacs_row) != set(folder_row):
        return False
    for key, value in pacs_row.items():
        other = folder_row[key]
        if key.startswith("prob_") and value and other:
            if abs(float(value) - float(other)) > 1.5e-6:
                return False
        elif key != "path" and value != other:
            return False
    return True


@pytest.fixture(scope="module")
def brain():
    return shared_data("brain_mr_dicom_studies")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, brain):
    """Orthanc holding the three brain MR studies (195 instances, 7 series) and the 3-slice liver CT."""
    ct = shared_data("ct_liver_seg_dicom", "ct")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), {"MEDTRANSFER": MOVE_PORT}).start()
    try:
        server.upload(sorted(brain.rglob("*.dcm")) + sorted(ct.glob("*.dcm")))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cls_run(small_demo, tmp_path_factory):
    """A tiny 2D classifier trained for two epochs on the synthetic demo set (32 px)."""
    from medtransfer.config import load_config
    from medtransfer.train.finetune import finetune

    cfg = load_config("xray", overrides=["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
                                         "train.head_epochs=1", "train.finetune_epochs=1", "train.batch_size=16"])
    return finetune(cfg, data=small_demo, labels=small_demo / "labels.csv",
                    out_dir=tmp_path_factory.mktemp("cls") / "run").run_dir


@pytest.fixture(scope="module")
def folder_rows(cls_run, brain, tmp_path_factory):
    """predict over the shared folder itself: all images, and the HippoCrop selection."""
    out = tmp_path_factory.mktemp("folder")
    everything = _csv(predict_folder(cls_run, brain, out / "all.csv").out_csv)
    hippo = _csv(predict_folder(cls_run, brain, out / "hippo.csv",
                                series_filter=SeriesFilter(description="HippoCrop")).out_csv)
    return everything, hippo


def _predict_cli(*args):
    res = CliRunner().invoke(app, ["predict", *map(str, args)])
    return res


@pytest.fixture(scope="module")
def pacs_runs(pacs, cls_run, tmp_path_factory):
    """The same selection over DICOMweb (results by STOW-RS) and DIMSE C-GET (results by C-STORE)."""
    out = tmp_path_factory.mktemp("pacs_runs")
    web = _predict_cli(cls_run, pacs.dicomweb + "?Modality=MR", "--out", out / "web.csv", "--series-description",
                       "HippoCrop", "--send-to", pacs.dicomweb, "--pacs-set", "chunk_size=16", "--study-json",
                       out / "studies", "--parquet", "-q")
    dimse = _predict_cli(cls_run, pacs.dimse + "?Modality=MR", "--out", out / "dimse.csv", "--series-description",
                         "HippoCrop", "--send-to", pacs.dimse, "--pacs-set", "chunk_size=16", "--results-dir",
                         out / "dimse-results", "-q")
    assert web.exit_code == 0, web.output
    assert dimse.exit_code == 0, dimse.output
    return out


def test_dicomweb_and_dimse_rows_equal_folder_rows(pacs_runs, folder_rows):
    _, hippo = folder_rows
    web, dimse = _csv(pacs_runs / "web.csv"), _csv(pacs_runs / "dimse.csv")
    assert (pacs_runs / "web.csv").read_text() == (pacs_runs / "dimse.csv").read_text()
    assert Counter(r["status"] for r in web) == Counter(r["status"] for r in hippo) == {"ok": 107, "skipped": 88}
    folder = _by_sop(hippo)
    assert set(_by_sop(web)) == set(folder)
    for sop, row in _by_sop(web).items():
        assert _agree(row, folder[sop]), (row, folder[sop])  # probabilities to the 6th digit, reasons, UIDs
        assert row["path"] == (f"studies/{row['study_instance_uid']}/series/{row['series_instance_uid']}"
                               f"/instances/{sop}")
    text = (pacs_runs / "web.csv").read_text()
    assert "PGBM" not in text and "^" not in text  # no patient IDs or names in the table
    assert len(list((pacs_runs / "studies").glob("*.json"))) == 3 and (pacs_runs / "web.parquet").is_file()


def _sr_instances(pacs):
    return {item["00080018"]["Value"][0]: item for item in pacs.instances(Modality="SR")}


def test_reports_found_by_qido_and_cfind_parse_and_reference_their_images(pacs, pacs_runs, cls_run, folder_rows):
    import highdicom as hd

    from medtransfer.hospital import open_pacs
    from medtransfer.hospital.sr import file_sha256

    rows = _csv(pacs_runs / "web.csv")
    files = {r["sop_instance_uid"]: r["path"] for r in folder_rows[0]}
    ok_by_study = {}
    for r in rows:
        if r["status"] == "ok":
            ok_by_study.setdefault(r["study_instance_uid"], {})[r["sop_instance_uid"]] = r
    written = sorted((pacs_runs / "web-results").glob("*.sr.dcm"))
    assert [p.name.split(".sr")[0] for p in written] == sorted(ok_by_study)
    # both runs wrote the same reports (stable UIDs), so Orthanc holds one per study
    assert {p.name for p in (pacs_runs / "dimse-results").glob("*.sr.dcm")} == {p.name for p in written}
    on_pacs = _sr_instances(pacs)
    found = open_pacs(pacs.dimse + "?Modality=SR", ConnectionSettings()).query(["SOPInstanceUID"])
    assert {r.sop_uid for r in found} == set(on_pacs)
    sha = file_sha256(cls_run / "model.pt")
    for path in written:
        sr = hd.sr.srread(path)
        assert str(sr.SOPInstanceUID) in on_pacs and isinstance(sr, hd.sr.ComprehensiveSR)
        ok = ok_by_study[str(sr.StudyInstanceUID)]
        evidence = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
        assert evidence == set(ok)
        source = pydicom.dcmread(files[next(iter(ok))], stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
            assert str(sr.get(keyword) or "") == str(source.get(keyword) or ""), keyword  # from the source images
        assert sr.Manufacturer == "medtransfer" and sr.CompletionFlag == "COMPLETE"
        _check_groups(sr, ok, sha, Path(cls_run).resolve().name)


def _check_groups(sr, ok_rows, sha, model_name):
    """Every image group carries that image's probabilities, its decision and the model's sha256."""
    import highdicom as hd

    groups = hd.sr.utils.find_content_items(sr, name=hd.sr.CodedConcept("125007", "DCM", "Measurement Group"),
                                            recursive=True)
    image_groups = {}
    for g in groups:
        images = [i for i in g.ContentSequence if i.ValueType == "IMAGE"]
        if images:
            image_groups[str(images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = g
    assert set(image_groups) == set(ok_rows)
    for sop, g in image_groups.items():
        nums = {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
                for i in g.ContentSequence if i.ValueType == "NUM"}
        row = ok_rows[sop]
        assert nums == pytest.approx({"Probability of 0": float(row["prob_0"]),
                                      "Probability of 1": float(row["prob_1"])}, abs=1e-6)
        decision = [i for i in g.ContentSequence if i.ValueType == "CODE"
                    and i.ConceptNameCodeSequence[0].CodeMeaning == "1"]
        assert decision[0].ConceptCodeSequence[0].CodeMeaning == ("Present" if row["predicted"] == "1" else "Absent")
        names = [i.TextValue for i in g.ContentSequence if i.ValueType == "TEXT"
                 and i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"]
        assert names == [model_name]  # every group names the algorithm
    study_params = [i.TextValue for i in groups[0].ContentSequence if i.ValueType == "TEXT"
                    and i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
    assert f"model_sha256={sha}" in study_params  # the study group (first) carries the model's identity


def test_dimse_c_move_with_a_slice_thickness_range(pacs, cls_run, folder_rows, tmp_path):
    """C-MOVE to our own storage SCP; --where SliceThickness=4:6 keeps the 5 mm series, skips the 1 mm crops."""
    out = tmp_path / "move.csv"
    res = _predict_cli(cls_run, pacs.dimse + "?Modality=MR", "--out", out, "--where", "SliceThickness=4:6",
                       "--pacs-set", "retrieve=move", "--pacs-set", f"move_port={MOVE_PORT}",
                       "--pacs-set", "move_bind=127.0.0.1", "-q")
    assert res.exit_code == 0, res.output
    rows = _by_sop(_csv(out))
    folder = _by_sop(folder_rows[0])
    assert Counter(r["status"] for r in rows.values()) == {"ok": 88, "skipped": 107}
    for sop, row in rows.items():
        if row["status"] == "ok":
            assert _agree(row, folder[sop]), (row, folder[sop])
        else:
            assert row["reason"] == "SliceThickness 1 outside the selection SliceThickness 4–6"
            assert row["sop_instance_uid"] == sop and not row["prob_0"]


def test_3d_model_over_dicomweb_one_row_and_one_report_per_series(pacs, brain, tmp_path):
    import highdicom as hd

    from test_batch_inference import make_run

    run3d = make_run(tmp_path / "tiny3d", backbone="tiny_cnn3d.random", dims=3, size=16)
    select = ["--series-description", "hippo", "--min-slices", "33"]
    folder = _csv(predict_folder(run3d, brain, tmp_path / "folder.csv",
                                 series_filter=SeriesFilter(description="hippo", min_slices=33)).out_csv)
    res = _predict_cli(run3d, pacs.dicomweb + "?Modality=MR", "--out", tmp_path / "web.csv", *select, "-q")
    assert res.exit_code == 0, res.output
    web = {r["series_instance_uid"]: r for r in _csv(tmp_path / "web.csv")}
    assert len(web) == 7 and Counter(r["status"] for r in web.values()) == {"ok": 2, "skipped": 5}
    for row in folder:
        mine = web[row["series_instance_uid"]]
        assert [mine[k] for k in ("status", "reason", "prob_negative", "prob_positive", "predicted")] == \
            [row[k] for k in ("status", "reason", "prob_negative", "prob_positive", "predicted")]
        assert len(mine["files"].split(";")) == len(row["files"].split(";"))
    reports = sorted((tmp_path / "web-results").glob("*.sr.dcm"))
    assert sorted(p.name.split(".sr")[0] for p in reports) == sorted(s for s, r in web.items() if r["status"] == "ok")
    for path in reports:
        sr = hd.sr.srread(path)
        refs = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                for ser in s.ReferencedSeriesSequence for i in ser.ReferencedSOPSequence}
        row = web[path.name.split(".sr")[0]]
        assert refs == {key.rsplit("/", 1)[1] for key in row["files"].split(";")}


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A tiny 2D segmentation run trained on synthetic boxes, its output bias then set so that every
    pixel is foreground: the test below is about the SEG's transport and references, not the model."""
    import json

    import nibabel as nib
    import numpy as np

    from medtransfer.segmentation import load_seg_config, train_segmentation

    root = tmp_path_factory.mktemp("segdata")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        label = np.zeros((16, 16, 6), np.uint8)
        label[4:10, 5:11, 1:5] = 1
        image = (label * 100.0 + rng.normal(0, 5, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"case_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case_{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    cfg = load_seg_config("ct", data={"path": str(root)}, model={"encoder": "tiny_cnn.random", "weights": "none"},
                          overrides=["train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=2",
                                     "train.val_every=1", "train.overlay_plots=0", "data.spacing=[]",
                                     "data.val_fraction=0.25", "train.patch_size=[64, 64]", "train.sw_batch_size=16"])
    run = tmp_path_factory.mktemp("seg") / "run"
    train_segmentation(cfg, run)
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["head.out.weight"].zero_()
    ckpt["state_dict"]["head.out.bias"].copy_(torch.tensor([0.0, 10.0]))
    torch.save(ckpt, run / "model.pt")
    return run


def test_segmentation_over_dicomweb_sends_a_seg_found_by_qido_and_cfind(pacs, seg_run, tmp_path):
    import highdicom as hd

    from medtransfer.hospital import open_pacs

    ct = sorted(shared_data("ct_liver_seg_dicom", "ct").glob("*.dcm"))
    res = _predict_cli(seg_run, pacs.dicomweb + "?Modality=CT", "--out", tmp_path / "seg.csv",
                       "--send-to", pacs.dimse, "-q")
    assert res.exit_code == 0, res.output
    (row,) = _csv(tmp_path / "seg.csv")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct]
    assert row["status"] == "ok" and row["series_instance_uid"] == sources[0].SeriesInstanceUID
    voxel_ml = float(sources[0].PixelSpacing[0]) * float(sources[0].PixelSpacing[1]) * 1.0 / 1000  # 1 mm apart
    assert float(row["volume_ml_liver"]) == pytest.approx(512 * 512 * 3 * voxel_ml, rel=1e-3)
    on_pacs = pacs.instances(Modality="SEG")
    assert [i["00080018"]["Value"][0] for i in on_pacs] == [row["seg_sop_instance_uid"]]
    found = open_pacs(pacs.dimse + "?Modality=SEG", ConnectionSettings()).query(["SOPInstanceUID"])
    assert [r.sop_uid for r in found] == [row["seg_sop_instance_uid"]]
    seg = hd.seg.segread(tmp_path / "seg-results" / f"{row['series_instance_uid']}.seg.dcm")
    assert seg.SOPInstanceUID == row["seg_sop_instance_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {s.SOPInstanceUID for s in sources}
    assert (seg.PatientID, seg.StudyInstanceUID) == (sources[0].PatientID, sources[0].StudyInstanceUID)
    assert seg.get_segment_description(1).SegmentLabel == "liver"


def test_killed_job_resumes_with_each_instance_exactly_once(pacs, folder_rows, cls_run, tmp_path):
    """SIGKILL mid-job (the PACS frozen at the first rows: at most three of the seven series are
    retrieved by then, so the kill lands before the end), then --resume."""
    out = tmp_path / "killed.csv"
    partial = tmp_path / "killed.csv.partial"
    args = [cls_run, pacs.dicomweb + "?Modality=MR", "--out", out, "--pacs-set", "chunk_size=8", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "medtransfer", "predict", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 2):
            assert proc.poll() is None, "the job ended before it could be interrupted"
            time.sleep(0.01)
        pacs.pause()
        time.sleep(0.5)  # what was already retrieved is predicted; then the job waits on the frozen PACS
        proc.kill()
        proc.wait()
    finally:
        pacs.resume()
    before = _csv(partial)
    assert 0 < len(before) < 195
    spool = tmp_path / ".killed.csv.spool"
    assert spool.is_dir()  # the killed job's spool (images it had not predicted yet) is left beside its table ...
    res = _predict_cli(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert not spool.exists()  # ... and the next job on that table removes them
    rows = _csv(out)
    assert len(rows) == 195 and len({r["sop_instance_uid"] for r in rows}) == 195
    assert rows[:len(before)] == before  # what was written before the kill is kept, not redone
    folder = _by_sop(folder_rows[0])
    assert all(_agree(r, folder[r["sop_instance_uid"]]) for r in rows)  # as if never interrupted
    assert [r["path"] for r in rows] == sorted((r["path"] for r in rows), key=lambda p: p.split("/")[1])
    assert len(list((tmp_path / "killed-results").glob("*.sr.dcm"))) == 3


@pytest.fixture
def small_pacs(tmp_path, brain):
    """A fresh Orthanc with the two HippoCrop series of Study1 and Study2 (32 + 35 instances)."""
    server = OrthancServer(tmp_path / "orthanc").start()
    server.upload(sorted((brain / "Study1").rglob("*.dcm")) + sorted((brain / "Study2").rglob("*.dcm")))
    yield server
    server.stop()


FAST_FAIL = ["--pacs-set", "retries=1", "--pacs-set", "backoff=0.1", "--pacs-set", "chunk_size=16"]


def test_pacs_stopped_mid_retrieve_gives_error_rows_and_exit_0(small_pacs, cls_run, tmp_path, monkeypatch):
    from medtransfer.hospital.dicomweb import DicomWebPacs

    real = DicomWebPacs.retrieve
    calls = []

    def retrieve_then_stop(self, records, dest, sizes):
        failures = real(self, records, dest, sizes)
        calls.append(len(records))
        if len(calls) == 1:
            small_pacs.stop()  # the PACS goes away after the first chunk
        return failures

    monkeypatch.setattr(DicomWebPacs, "retrieve", retrieve_then_stop)
    start = time.monotonic()
    res = _predict_cli(cls_run, small_pacs.dicomweb, "--out", tmp_path / "p.csv", *FAST_FAIL)
    assert time.monotonic() - start < 30
    assert res.exit_code == 0, res.output  # something was predicted
    rows = _csv(tmp_path / "p.csv")
    by_status = {s: [r for r in rows if r["status"] == s] for s in ("ok", "error")}
    assert len(rows) == 67 and sorted(map(len, by_status.values())) == [32, 35]
    assert len(by_status["ok"]) == calls[0]  # the first chunk (one whole series) was predicted
    assert all(r["reason"].startswith("not retrievable: ") and "cannot reach" in r["reason"] for r in by_status["error"])
    assert len({r["series_instance_uid"] for r in by_status["ok"]}) == 1
    assert len(list((tmp_path / "p-results").glob("*.sr.dcm"))) == 1  # the report of the predicted study


def test_pacs_gone_before_any_retrieval_exits_1(small_pacs, cls_run, tmp_path, monkeypatch):
    from medtransfer.hospital.dimse import DimsePacs

    real = DimsePacs.query

    def query_then_stop(self, *a, **k):
        records = real(self, *a, **k)
        small_pacs.stop()
        return records

    monkeypatch.setattr(DimsePacs, "query", query_then_stop)
    res = _predict_cli(cls_run, small_pacs.dimse, "--out", tmp_path / "p.csv", *FAST_FAIL)
    assert res.exit_code == 1 and "no input could be predicted" in res.output
    rows = _csv(tmp_path / "p.csv")
    assert len(rows) == 67 and {r["status"] for r in rows} == {"error"}
    assert all(r["reason"].startswith("not retrievable: cannot reach") for r in rows), rows[0]["reason"]


@pytest.mark.parametrize("protocol", ["dimse", "dicomweb"])
def test_hanging_pacs_times_out_instead_of_hanging(small_pacs, cls_run, tmp_path, monkeypatch, protocol):
    from medtransfer.hospital.dicomweb import DicomWebPacs
    from medtransfer.hospital.dimse import DimsePacs

    cls = DimsePacs if protocol == "dimse" else DicomWebPacs
    real = cls.query

    def query_then_freeze(self, *a, **k):
        short, self.settings.timeout = self.settings.timeout, 30.0  # the query is answered, however busy the CPU
        records = real(self, *a, **k)
        self.settings.timeout = short
        small_pacs.pause()  # then it accepts TCP connections and answers nothing
        return records

    monkeypatch.setattr(cls, "query", query_then_freeze)
    start = time.monotonic()
    try:
        res = _predict_cli(cls_run, getattr(small_pacs, protocol), "--out", tmp_path / "p.csv", *FAST_FAIL,
                           "--pacs-set", "timeout=1.5")
    finally:
        small_pacs.resume()
    elapsed = time.monotonic() - start
    assert res.exit_code == 1
    rows = _csv(tmp_path / "p.csv")
    assert len(rows) == 67 and {r["status"] for r in rows} == {"error"}
    assert all(r["reason"].startswith("timed out: ") for r in rows), rows[0]["reason"]
    assert elapsed < 20  # two attempts of 1.5 s, then the PACS is marked down for the rest of the job


def test_basic_auth_works_and_the_password_is_never_printed(tmp_path, brain, cls_run, monkeypatch):
    password = "s3cret-Pw-1234"
    server = OrthancServer(tmp_path / "orthanc", users={"ai": password}).start()
    try:
        server.upload(sorted((brain / "Study1").rglob("*.dcm")))
        monkeypatch.setenv("PACS_PW", password)
        auth = ["--pacs-set", "username=ai", "--pacs-set", "password_env=PACS_PW"]
        good = _predict_cli(cls_run, server.dicomweb, "--out", tmp_path / "ok.csv", *auth)
        assert good.exit_code == 0, good.output
        assert Counter(r["status"] for r in _csv(tmp_path / "ok.csv")) == {"ok": 32}
        monkeypatch.setenv("PACS_PW", "wrong-" + password)
        bad = _predict_cli(cls_run, server.dicomweb, "--out", tmp_path / "bad.csv", *auth)
        assert bad.exit_code == 1 and "rejected: QIDO-RS search: HTTP 401" in bad.output
        on_cli = _predict_cli(cls_run, server.dicomweb, "--out", tmp_path / "x.csv", "--pacs-set", f"password={password}")
        assert on_cli.exit_code == 2 and "never given on the command line" in on_cli.output
        for res in (good, bad, on_cli):
            assert password not in res.output
    finally:
        server.stop()


def _serve(run_dir, port, state, send_to, quiet_period):
    from orthanc_server import free_port as _  # noqa: F401  (same helpers as the PACS)

    cmd = [sys.executable, "-m", "medtransfer", "serve", str(run_dir), "--dimse-port", str(port), "--ae-title",
           "MEDTRANSFER", "--bind", "127.0.0.1", "--state-dir", str(state), "--quiet-period", str(quiet_period),
           "--send-to", send_to]
    log = open(state.parent / f"serve-{time.monotonic_ns()}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()
        try:
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("medtransfer serve did not listen within 60 s")


def _sigterm(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _push(storescu, port, files):
    return subprocess.Popen([storescu, "-aet", "MODALITY", "-aec", "MEDTRANSFER", "127.0.0.1", str(port),
                             *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_listener_predicts_pushed_studies_once_across_restarts(cls_run, brain, tmp_path):
    """storescu → medtransfer serve → SR in Orthanc; SIGTERM before the quiet period loses nothing;
    two concurrent associations; a third start repeats nothing."""
    import sqlite3

    from orthanc_server import dcmtk_tool

    storescu, dsrdump = dcmtk_tool("storescu"), dcmtk_tool("dsrdump")
    if storescu is None or dsrdump is None:
        pytest.skip("DCMTK (storescu, dsrdump) is not installed (Debian: apt-get install dcmtk)")
    server = OrthancServer(tmp_path / "orthanc").start()
    port, state = free_port(), tmp_path / "state"
    state.mkdir()
    study2 = sorted((brain / "Study2").rglob("*.dcm"))
    t1, flair = (sorted((brain / "Study3" / d).glob("*.dcm")) for d in ("11-T1post-18670", "36468-FLAIRreg-58706"))
    proc = None
    try:
        proc = _serve(cls_run, port, state, server.dicomweb, quiet_period=120)
        push = _push(storescu, port, study2)
        assert push.wait(timeout=60) == 0, push.stderr.read()
        _sigterm(proc)  # stopped long before the quiet period ends
        assert server.instances(Modality="SR") == []
        with sqlite3.connect(state / "journal.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM instances WHERE batch_id IS NULL").fetchone()[0] == 35

        proc = _serve(cls_run, port, state, server.dicomweb, quiet_period=1)
        pushes = [_push(storescu, port, t1), _push(storescu, port, flair)]  # two associations at once
        assert [p.wait(timeout=60) for p in pushes] == [0, 0]
        assert _wait_for(lambda: len(server.instances(Modality="SR")) == 2), "no SR reached Orthanc"
        _sigterm(proc)

        proc = _serve(cls_run, port, state, server.dicomweb, quiet_period=1)
        time.sleep(2)
        _sigterm(proc)
        reports = server.instances(Modality="SR")
        assert len(reports) == 2
        assert {r["0020000D"]["Value"][0] for r in reports} == {pydicom.dcmread(study2[0]).StudyInstanceUID,
                                                                 pydicom.dcmread(t1[0]).StudyInstanceUID}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        server.stop()
    rows = [r for f in sorted((state / "rows").glob("*.csv")) for r in _csv(f)]
    pushed = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in study2 + t1 + flair}
    assert len(rows) == len(pushed) == 79 and {r["sop_instance_uid"] for r in rows} == pushed
    assert {r["status"] for r in rows} == {"ok"}
    assert not list((state / "incoming").rglob("*.dcm"))  # delivered: the received images are gone
    for sr in (state / "results").glob("*.sr.dcm"):
        out = subprocess.run([dsrdump, str(sr)], capture_output=True, text=True)
        assert out.returncode == 0 and not out.stderr.strip() and "Imaging Measurement Report" in out.stdout, out.stderr


def test_dicomwebs_verifies_the_server_certificate(small_pacs, cls_run, tmp_path):
    """HTTPS (a TLS front for Orthanc): trusted with the right CA bundle (ca_cert), rejected otherwise."""
    from orthanc_server import TlsProxy, self_signed_pem

    pem = self_signed_pem(tmp_path)
    if pem is None:
        pytest.skip("openssl is not installed: no certificate for the HTTPS test")
    with TlsProxy(small_pacs.http_port, pem) as proxy:
        url = f"dicomwebs://127.0.0.1:{proxy.port}/dicom-web?SeriesDescription=HippoCrop&PatientID=PGBM-002"
        good = _predict_cli(cls_run, url, "--out", tmp_path / "ok.csv", "--pacs-set", f"ca_cert={pem}", "-q")
        assert good.exit_code == 0, good.output
        assert Counter(r["status"] for r in _csv(tmp_path / "ok.csv")) == {"ok": 32}
        bad = _predict_cli(cls_run, url, "--out", tmp_path / "bad.csv", "-q")
        assert bad.exit_code == 1 and "rejected: QIDO-RS search: TLS handshake" in bad.output
