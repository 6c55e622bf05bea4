"""Hospital integration without a PACS: addresses, settings and secrets, selection ranges, work units
and shards, chunks, the SR on real images checked with DCMTK's dsrdump, the listener's journal."""
import csv
import logging
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from typer.testing import CliRunner

from conftest import shared_data
from medtransfer.errors import ConfigError
from medtransfer.hospital import ConnectionSettings, load_settings, parse_pacs_url, parse_range
from medtransfer.hospital.connection import PacsError, with_retries
from medtransfer.hospital.selection import InstanceRecord, Selection, plan_units, shard_by_study
from medtransfer.hospital.spool import make_chunks
from medtransfer.inference.batch import SeriesFilter


def test_pacs_addresses():
    web = parse_pacs_url("dicomweb://pacs.example:8042/dicom-web?StudyDate=20240101-20240131&Modality=CR")
    assert web.base_url == "http://pacs.example:8042/dicom-web"
    assert web.search_keys() == {"StudyDate": "20240101-20240131", "Modality": "CR"}
    assert parse_pacs_url("dicomwebs://pacs:443/wado").base_url == "https://pacs:443/wado"
    dimse = parse_pacs_url("dimse://ORTHANC@10.0.0.5:4242?AccessionNumber=A1*")
    assert (dimse.called_aet, dimse.host, dimse.port, dimse.search_keys()) == ("ORTHANC", "10.0.0.5", 4242,
                                                                            {"AccessionNumber": "A1*"})
    assert dimse.describe() == "dimse://ORTHANC@10.0.0.5:4242"
    with pytest.raises(ConfigError, match="Did you mean 'StudyDate'"):
        parse_pacs_url("dicomweb://pacs:8042/dicom-web?StudyDat=2024")
    with pytest.raises(ConfigError, match="must not carry a password"):
        parse_pacs_url("dicomweb://ai:secret@pacs:8042/dicom-web")
    with pytest.raises(ConfigError, match="needs the PACS's AE title"):
        parse_pacs_url("dimse://pacs:104")
    with pytest.raises(ConfigError, match="needs a host and a port"):
        parse_pacs_url("dicomweb://pacs/dicom-web")


def test_settings_from_file_and_overrides_keep_secrets_out_of_text(tmp_path, monkeypatch):
    path = tmp_path / "pacs.yaml"
    path.write_text("calling_aet: AI_NODE\ntimeout: 12\nusername: ai\npassword: file-secret-42\n")
    settings = load_settings(path, ["retries=5", "retrieve=move", "move_port=11200"])
    assert (settings.calling_aet, settings.timeout, settings.retries, settings.retrieve, settings.move_port) == \
        ("AI_NODE", 12.0, 5, "move", 11200)
    assert settings.secret("password") == "file-secret-42"
    assert "file-secret-42" not in repr(settings) + settings.describe() + str(vars(ConnectionSettings))
    monkeypatch.setenv("PACS_TOKEN", "tok-123")
    assert load_settings(None, ["token_env=PACS_TOKEN"]).secret("token") == "tok-123"
    with pytest.raises(ConfigError, match="never given on the command line"):
        load_settings(None, ["password=oops"])
    with pytest.raises(ConfigError, match="Did you mean 'timeout'"):
        load_settings(None, ["timout=3"])
    with pytest.raises(ConfigError, match="retrieve must be 'get' or 'move'"):
        load_settings(None, ["retrieve=push"])
    with pytest.raises(ConfigError, match="PACS_PW, which is not set"):
        load_settings(None, ["password_env=PACS_PW"]).secret("password")


def test_retries_back_off_then_report_the_attempts(monkeypatch):
    sleeps = []
    monkeypatch.setattr("time.sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        raise PacsError("timed out: no answer", transient=True)

    with pytest.raises(PacsError, match=r"timed out: no answer \(after 4 attempts\)"):
        with_retries(flaky, ConnectionSettings(retries=3, backoff=0.5), "C-FIND")
    assert sleeps == [0.5, 1.0, 2.0] and len(calls) == 4
    calls.clear()
    with pytest.raises(PacsError, match="^rejected: x$"):  # not transient: no retry
        with_retries(lambda: (calls.append(1), (_ for _ in ()).throw(PacsError("rejected: x")))[1],
                     ConnectionSettings(retries=3), "C-GET")
    assert len(calls) == 1


def test_numeric_ranges_on_header_attributes():
    rng = parse_range("SliceThickness=2.5:5")
    assert rng.reason_to_skip("3") is None and rng.reason_to_skip("5") is None
    assert rng.reason_to_skip("1") == "SliceThickness 1 outside the selection SliceThickness 2.5–5"
    assert rng.reason_to_skip("") == "SliceThickness missing (selection SliceThickness 2.5–5)"
    open_high = parse_range("Rows=512:")
    assert open_high.reason_to_skip("1024") is None and "Rows >= 512" in open_high.reason_to_skip("256")
    assert parse_range("PixelSpacing=:0.8").reason_to_skip("0.7\\0.9") == \
        "PixelSpacing 0.7\\0.9 outside the selection PixelSpacing <= 0.8"
    with pytest.raises(ConfigError, match="needs a numeric attribute; SeriesDescription has VR LO"):
        parse_range("SeriesDescription=1:2")
    with pytest.raises(ConfigError, match="KEYWORD=LOW:HIGH"):
        parse_range("SliceThickness>2")
    with pytest.raises(ConfigError, match="low end 5 is above the high end 2"):
        parse_range("SliceThickness=5:2")


def _records(n_studies=3, series_per_study=2, per_series=4, thickness="5"):
    return [InstanceRecord(f"1.{s}", f"1.{s}.{r}", f"1.{s}.{r}.{i}", "1.2.840.10008.5.1.4.1.1.4", "MR",
                           "T1" if r == 0 else "HippoCrop", i, {"SliceThickness": thickness if r == 0 else None})
            for s in range(n_studies) for r in range(series_per_study) for i in range(per_series, 0, -1)]


def test_units_skip_on_the_query_answers_and_shards_keep_studies_whole():
    sel = Selection(SeriesFilter(description="T1"), (parse_range("SliceThickness=4:6"),))
    units = plan_units(_records(), per_series=False, selection=sel)
    assert len(units) == 24
    assert [u.records[0].instance_number for u in units[:4]] == [1, 2, 3, 4]  # instance order within a series
    skipped = [u for u in units if u.status]
    assert len(skipped) == 12 and {u.reason for u in skipped} == {
        "series description 'HippoCrop' does not match 'T1'"}
    assert not sel.needs_header_check(units[0].records)  # the query answered SliceThickness
    series = plan_units(_records(), per_series=True, selection=Selection(SeriesFilter(min_slices=5)))
    assert len(series) == 6 and {u.reason for u in series} == {"4 slice(s), fewer than the minimum 5"}
    shards = [shard_by_study(units, (i, 2)) for i in range(2)]
    assert shards[0] + shards[1] == units
    assert not {u.study_uid for u in shards[0]} & {u.study_uid for u in shards[1]}


def test_chunks_end_at_series_boundaries_and_split_huge_series():
    units = plan_units(_records(n_studies=1, series_per_study=3, per_series=10), False, Selection())
    assert [len(c.units) for c in make_chunks(units, 16)] == [20, 10]
    huge = plan_units(_records(n_studies=1, series_per_study=1, per_series=100), False, Selection())
    assert [len(c.units) for c in make_chunks(huge, 4)] == [32, 32, 32, 4]  # at most 8 × chunk_size


@pytest.fixture(scope="module")
def study_rows(tmp_path_factory):
    """Folder predictions of one real MR study (the HippoCrop series of Study1) with a tiny model."""
    from test_batch_inference import make_run

    from medtransfer.inference import predict_folder

    folder = shared_data("brain_mr_dicom_studies", "Study1")
    tmp = tmp_path_factory.mktemp("sr")
    run = make_run(tmp / "run")
    rows = list(csv.DictReader(open(predict_folder(run, folder, tmp / "p.csv").out_csv)))
    return run, rows


def test_sr_is_valid_tid1500_with_identity_from_the_images(study_rows, tmp_path):
    import highdicom as hd

    from medtransfer.hospital.sr import classification_report, identity_of, model_identity
    from medtransfer.inference import load_run

    run_dir, rows = study_rows
    run = load_run(run_dir, "cpu")
    headers = {r["path"]: pydicom.dcmread(r["path"], stop_before_pixels=True) for r in rows}
    sources = {p: [(str(h.SeriesInstanceUID), str(h.SOPClassUID), str(h.SOPInstanceUID))] for p, h in headers.items()}
    model = model_identity(run)
    first = headers[rows[0]["path"]]
    sr = classification_report(identity_of(first), rows, model, sources, per_series=False)
    again = classification_report(identity_of(first), rows, model, sources, per_series=False)
    assert sr.SOPInstanceUID == again.SOPInstanceUID  # stable: a resend replaces, never duplicates
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = hd.sr.srread(path)
    assert (back.PatientName, back.PatientID, back.StudyInstanceUID) == (first.PatientName, first.PatientID,
                                                                        first.StudyInstanceUID)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # the study group: each class's highest probability over the 32 images
    assert f"operating_point=p(positive)>={run.threshold:.4g}" in model.parameters()
    groups = hd.sr.utils.find_content_items(back, name=hd.sr.CodedConcept("125007", "DCM", "Measurement Group"),
                                            recursive=True)
    assert len(groups) == 33  # the study, then each of its 32 images
    study = {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
             for i in groups[0].ContentSequence if i.ValueType == "NUM"}
    assert study["Probability of positive"] == pytest.approx(max(float(r["prob_positive"]) for r in rows), abs=1e-6)
    assert study["Probability of negative"] == pytest.approx(max(float(r["prob_negative"]) for r in rows), abs=1e-6)
    text = _dsrdump(path)
    assert "Imaging Measurement Report" in text and text.count('"Measurement Group"') == 33


def _dsrdump(path) -> str:
    from orthanc_server import dcmtk_tool

    tool = dcmtk_tool("dsrdump")
    if tool is None:
        pytest.skip("DCMTK dsrdump is not installed (Debian: apt-get install dcmtk)")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True)  # strict: constraints checked
    assert out.returncode == 0, out.stderr
    assert not out.stderr.strip() and "invalid" not in out.stdout.lower(), out.stderr  # no warning, no bad code
    validator = __import__("shutil").which("dciodvfy")
    if validator:  # dicom3tools, when installed: no errors in the IOD
        check = subprocess.run([validator, str(path)], capture_output=True, text=True)
        assert "Error" not in check.stderr, check.stderr
    return out.stdout


def test_journal_keeps_every_instance_once_across_reopen(tmp_path):
    from medtransfer.hospital.journal import Journal, JournaledInstance

    db = tmp_path / "journal.sqlite"
    j = Journal(db)
    inst = [JournaledInstance(f"1.{i}", "S1" if i < 3 else "S2", "R", "C", f"/x/{i}") for i in range(5)]
    for i, x in enumerate(inst):
        assert j.record(x, now=100.0 + i)
    assert j.due_studies(quiet_period=10, now=105) == []
    assert j.due_studies(quiet_period=10, now=112.5) == ["S1"]  # S2's last instance came at 104
    batch = j.open_batch("S1", now=113)
    assert [i.sop_uid for i in j.instances(batch.id)] == ["1.0", "1.1", "1.2"]
    assert not j.record(inst[0], now=120)  # a repeat of an instance already in a batch is dropped
    j.set_state(batch.id, "predicted")
    j.close()
    j = Journal(db)  # a restart
    assert [(b.id, b.state) for b in j.unfinished()] == [(batch.id, "predicted")]
    assert j.counts() == {"waiting": 2, "pending": 0, "predicted": 1, "delivered": 0}
    assert j.open_batch("S1") is None and j.due_studies(10, now=200) == ["S2"]
    j.set_state(batch.id, "delivered")
    assert j.unfinished() == []


def test_predict_with_pacs_options_on_a_folder_is_bad_usage(tmp_path):
    from medtransfer.cli.main import app

    res = CliRunner().invoke(app, ["predict", str(tmp_path), str(tmp_path), "--send-to", "dicomweb://h:1/x"])
    assert res.exit_code == 2 and "apply to PACS sources" in res.output
    res = CliRunner().invoke(app, ["predict", str(tmp_path), "dicomweb://h:1/x?Modalty=CR"])
    assert res.exit_code == 2 and "Did you mean 'Modality'" in res.output
    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "--quiet-period" in res.output and "medtransfer serve runs/" in res.output


def test_wado_rs_parts_are_written_byte_for_byte(tmp_path):
    """A Part 10 part goes to disk as received (no decode and re-encode: same bytes, private tags and
    all); a part without the Part 10 preamble is decoded and written as Part 10; unwanted parts are not
    written."""
    from pydicom.data import get_testdata_file

    from medtransfer.hospital.dicomweb import _save_part

    source = Path(get_testdata_file("CT_small.dcm", download=False))
    part = source.read_bytes()
    uid = str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)
    assert _save_part(part, tmp_path, {uid}) == uid
    assert (tmp_path / f"{uid}.dcm").read_bytes() == part
    assert _save_part(part, tmp_path / "none", {"1.2.3"}) is None and not (tmp_path / "none").exists()

    ds = pydicom.dcmread(source)
    from pydicom.filewriter import write_dataset

    bare = pydicom.filebase.DicomBytesIO()  # the dataset alone: no preamble, no file meta
    bare.is_little_endian, bare.is_implicit_VR = True, False
    write_dataset(bare, ds)
    body = bare.getvalue()
    assert body[128:132] != b"DICM"
    other = tmp_path / "bare"
    other.mkdir()
    assert _save_part(body, other, {uid}) == uid
    back = pydicom.dcmread(other / f"{uid}.dcm")
    assert back.preamble is not None and back.SOPInstanceUID == uid
    assert (back.pixel_array == ds.pixel_array).all()


def test_reports_are_built_in_the_job_when_the_report_process_is_unavailable(study_rows, tmp_path, monkeypatch):
    """A report process that cannot start (or died) costs no report: the job builds them itself, says so
    once, and every report is written."""
    from concurrent.futures.process import BrokenProcessPool

    import medtransfer.hospital.reports as reports
    from medtransfer.hospital.results import ResultSink
    from medtransfer.hospital.selection import Unit
    from medtransfer.hospital.sr import model_identity
    from medtransfer.inference import load_run

    run_dir, rows = study_rows
    starts = []

    class Broken:
        def submit(self, *args, **kwargs):
            raise BrokenProcessPool("the report process died")

        def shutdown(self, **kwargs):
            pass

    monkeypatch.setattr(reports, "report_process", lambda: starts.append(1) or Broken())
    headers = {r["path"]: pydicom.dcmread(r["path"], stop_before_pixels=True) for r in rows}
    units, job_rows = [], []
    for r in rows:
        h = headers[r["path"]]
        rec = InstanceRecord(str(h.StudyInstanceUID), str(h.SeriesInstanceUID), str(h.SOPInstanceUID),
                             str(h.SOPClassUID))
        units.append(Unit(rec.key, [rec]))
        job_rows.append(dict(r, path=rec.key, series_instance_uid=rec.series_uid))
    sink = ResultSink(tmp_path / "results")
    book = reports.ReportBook(sink, model_identity(load_run(run_dir, "cpu")), False, units, lambda unit: None,
                              background=True)
    book.remember_identity(units[0].study_uid, headers[rows[0]["path"]])
    warnings = []

    class Keep(logging.Handler):  # on the module's logger itself: the CLI tests change propagation
        def emit(self, record):
            warnings.append(record.getMessage())

    log = logging.getLogger("medtransfer.hospital.reports")
    handler, level = Keep(logging.WARNING), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        book.add(job_rows)
        book.close()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert sink.counts["written"] == 1 and len(list(sink.folder.glob("*.sr.dcm"))) == 1
    assert starts == [1] and len(warnings) == 1 and "report process is not available" in warnings[0]


class _SlowPacs:
    """A PACS whose query blocks until the model has started loading; records what happened when."""

    def __init__(self):
        self.events: list[str] = []
        self.loading = threading.Event()

    def describe(self) -> str:
        return "slow test PACS"

    def query(self, fields, range_keywords):
        self.events.append("query started")
        assert self.loading.wait(10), "the model did not load while the query ran"
        time.sleep(0.05)
        self.events.append("query ended")
        return []

    def close(self) -> None:
        self.events.append("closed")


def test_the_query_runs_while_the_model_loads_and_ends_before_the_connection(tmp_path, monkeypatch):
    import medtransfer.hospital.jobs as jobs
    import medtransfer.inference as inference
    from medtransfer.hospital import predict_from_pacs

    pacs = _SlowPacs()

    def load_run(run_dir, device):
        assert pacs.events == ["query started"]  # the query was asked before the model loads
        pacs.loading.set()
        raise RuntimeError("this run cannot be loaded")

    monkeypatch.setattr(jobs, "open_pacs", lambda endpoint, settings: pacs)
    monkeypatch.setattr(inference, "load_run", load_run)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        predict_from_pacs(tmp_path / "run", "dicomweb://127.0.0.1:1/dicom-web", tmp_path / "preds.csv")
    assert pacs.events == ["query started", "query ended", "closed"]  # a failed load still waits for the query


def test_a_query_failure_is_raised_by_the_job(tmp_path, monkeypatch):
    import medtransfer.hospital.jobs as jobs
    import medtransfer.hospital.pipeline as pipeline
    import medtransfer.inference as inference
    from medtransfer.hospital import predict_from_pacs

    class RefusingPacs(_SlowPacs):
        def query(self, fields, range_keywords):
            raise PacsError("rejected: QIDO-RS search: 403 Forbidden")

    monkeypatch.setattr(jobs, "open_pacs", lambda endpoint, settings: RefusingPacs())
    monkeypatch.setattr(pipeline, "ReportBook", lambda *a, **k: pytest.fail("no report book without a query"))

    run = SimpleNamespace(pre=SimpleNamespace(spec=SimpleNamespace(dims=2)))
    monkeypatch.setattr(inference, "load_run", lambda run_dir, device: run)
    with pytest.raises(PacsError, match="403 Forbidden"):
        predict_from_pacs(tmp_path / "run", "dicomweb://127.0.0.1:1/dicom-web", tmp_path / "preds.csv")
