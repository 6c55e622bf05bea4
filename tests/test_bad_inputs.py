"""Hostile input for every command, as a new user meets it: broken and renamed files, NaN pixels,
spreadsheet encodings, bad labels, bad checkpoints, concurrent writers, a disk too small, special
files. Each case asserts the exit code, the message, and that no output is lost, doubled or left
half-written — and that no traceback reaches the user.

Families are generated in temp folders; a family lists its cases so that new ones are one line.
"""
import csv
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medtransfer.cli.main import app

TINY = ["--backbone", "tiny_cnn.random", "--weights", "none", "-q", "--set", "data.size=32",
        "--set", "train.head_epochs=0", "--set", "train.finetune_epochs=1", "--set", "train.batch_size=8"]


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert "weights_only=False" not in result.output, result.output  # never advise unsafe loading
    return result


def no_temporaries(folder: Path) -> list[str]:
    """Half-written files a crash could leave: ``.*.tmp`` beside the outputs."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]


# ---- a small labelled set of PNG images: 6 patients, a bright square means class 1 ---------------
def _png(path: Path, label: int, k: int) -> None:
    a = (np.arange(28 * 28).reshape(28, 28) * (k + 3) % 50).astype(np.uint8)
    if label:
        a[8:20, 8:20] = 220
    Image.fromarray(a).save(path)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    (root / "img").mkdir()
    rows = []
    for k in range(36):
        label = k % 2
        _png(root / "img" / f"im{k:02d}.png", label, k)
        rows.append({"path": f"img/im{k:02d}.png", "label": ["normal", "lesion"][label], "patient_id": f"P{k % 12}"})
    write_csv(root / "labels.csv", rows)
    return root


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8", delimiter: str = ",") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def rows_of(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "labels.csv", newline="")))


@pytest.fixture(scope="module")
def trained(pngs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    result = cli("finetune", "--data", pngs, "--labels", pngs / "labels.csv", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    return out


# ---- finetune: labels CSVs ------------------------------------------------------------------------
@pytest.mark.parametrize("encoding, delimiter", [("utf-8-sig", ","), ("utf-16", "\t"), ("cp1252", ";")])
def test_labels_as_spreadsheets_write_them_train(pngs, tmp_path, encoding, delimiter):
    rows = [{**r, "label": {"normal": "négatif", "lesion": "lésion"}[r["label"]]} for r in rows_of(pngs)]
    labels = write_csv(tmp_path / "labels.csv", [{**r, "path": str(pngs / r["path"])} for r in rows],
                       encoding, delimiter)
    result = cli("finetune", "--data", pngs, "--labels", labels, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 0, result.output
    names = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["label_names"]
    assert sorted(names) == ["lésion", "négatif"]  # accents read as written, not mojibake


BAD_LABELS = {  # name: (edit of the rows, exit code, message pattern)
    "empty label": (lambda rows: rows[2].update(label="") or rows, 1, r"no label .* line\(s\) 4"),
    "NaN label": (lambda rows: rows[5].update(label="NaN") or rows, 1, r"no label .* line\(s\) 7"),
    "conflicting duplicate": (lambda rows: rows + [{**rows[0], "label": "lesion"}], 1,
                              r"two different labels: img/im00.png: 'normal' \(line 2\), 'lesion' \(line 38\)"),
    "unknown split": (lambda rows: rows[1].update(split="holdout") or rows, 1, r"Line 3 .* split 'holdout'"),
    "missing file": (lambda rows: rows + [{**rows[0], "path": "img/gone.png"}], 1, r"1 file\(s\) listed .* do not exist"),
    "outside --data, forbidden": (lambda rows: rows + [{**rows[1], "path": "../elsewhere.png"}], 1,
                                  r"outside --data .* data.outside_paths=forbid"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_are_refused_with_line_numbers(pngs, tmp_path, case):
    edit, code, pattern = BAD_LABELS[case]
    data = tmp_path / "data"
    shutil.copytree(pngs, data)
    _png(tmp_path / "elsewhere.png", 1, 99)
    rows = [{**r, "split": r.get("split", "")} for r in rows_of(data)] if case == "unknown split" else rows_of(data)
    labels = write_csv(data / "labels.csv", edit(rows))
    result = cli("finetune", "--data", data, "--labels", labels, "--out", tmp_path / "run", *TINY,
                 "--set", "data.outside_paths=forbid")
    assert result.exit_code == code, result.output
    import re

    assert re.search(pattern, " ".join(result.output.split())), result.output
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run directory was written


def test_exact_duplicates_are_counted_once_and_outside_paths_warned(pngs, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pngs, data)
    _png(tmp_path / "elsewhere.png", 1, 99)
    rows = rows_of(data)
    labels = write_csv(data / "labels.csv", rows + [rows[3], {**rows[1], "path": "../elsewhere.png"}])
    result = CliRunner().invoke(app, ["finetune", "--data", str(data), "--labels", str(labels), "--out",
                                      str(tmp_path / "run"), *[a for a in TINY if a != "-q"]])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "1 duplicate row(s)" in out and "line(s) 38" in out and "outside --data" in out
    split = __import__("json").loads((tmp_path / "run" / "split_report.json").read_text())
    assert sum(s["images"] for s in split.values() if isinstance(s, dict)) == 37  # 36 + the outside one, once


def test_a_binary_file_as_labels_is_not_read_as_text(pngs, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)
    result = cli("finetune", "--data", pngs, "--labels", bad, "--out", tmp_path / "run", *TINY)
    assert result.exit_code == 1 and "not a text file" in result.output


# ---- finetune: bad images -----------------------------------------------------------------------
def _with_bad_image(pngs: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    data = tmp_path / "data"
    shutil.copytree(pngs, data)
    rows = rows_of(data)
    if kind == "nan":
        a = np.ones((28, 28), np.float32)
        a[3, 4] = np.nan
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(data / "img" / "bad.nii.gz"))
        name = "bad.nii.gz"
    else:  # a decompression bomb: a tiny PNG that claims 20,000 × 20,000 pixels
        Image.new("1", (20000, 20000)).save(data / "img" / "bomb.png")
        name = "bomb.png"
    write_csv(data / "labels.csv", rows + [{"path": f"img/{name}", "label": "lesion", "patient_id": "P3"}])
    return data, name


@pytest.mark.parametrize("kind, reason", [("nan", "1 NaN and 0 infinite value(s) of 784"), ("bomb", "decompression bomb")])
def test_a_bad_image_stops_training_naming_file_and_patient(pngs, tmp_path, kind, reason):
    data, name = _with_bad_image(pngs, tmp_path, kind)
    result = cli("finetune", "--data", data, "--labels", data / "labels.csv", "--out", tmp_path / "run", *TINY)
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and name in out and "patient P3" in out and reason in out, out
    assert "skip_bad_images" in out
    assert not (tmp_path / "run" / "model.pt").exists() and not no_temporaries(tmp_path / "run")


def test_skip_bad_images_leaves_them_out_and_says_so(pngs, tmp_path):
    data, name = _with_bad_image(pngs, tmp_path, "nan")
    result = cli("finetune", "--data", data, "--labels", data / "labels.csv", "--out", tmp_path / "run", *TINY,
                 "--set", "data.skip_bad_images=true")
    assert result.exit_code == 0, result.output
    metrics = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    assert [Path(s["path"]).name for s in metrics["skipped_images"]] == [name]
    assert metrics["skipped_images"][0]["patient_id"] == "P3"


# ---- finetune: values that pass validation and fail later, and the run directory -------------------
@pytest.mark.parametrize("args, pattern", [
    (["--set", "data.percentiles=[1]"], "two percentiles"),
    (["--set", "data.percentiles=[-5, 200]"], "two percentiles"),
    (["--set", "train.freeze=pattern", "--set", "train.freeze_pattern='(unclosed'"], "not a valid regular expression"),
    (["--weights", "/nonexistent/weights.pth"], "no such file"),
    (["--set", "train.epochs=3"], "Did you mean"),
])
def test_bad_values_exit_2_before_any_work(pngs, tmp_path, args, pattern):
    result = cli("finetune", "--data", pngs, "--labels", pngs / "labels.csv", "--out", tmp_path / "run",
                 *TINY[:2], *args)
    assert result.exit_code == 2 and pattern in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run").exists()


def test_a_run_directory_is_not_overwritten_by_accident(pngs, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = cli("finetune", "--data", pngs, "--labels", pngs / "labels.csv", "--out", run, *TINY,
                 "--set", "data.percentiles=[0.1, 99.9]")
    assert result.exit_code == 2 and "not empty" in result.output and "--overwrite" in result.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched


# ---- a disk too small for the output (a real tmpfs) -------------------------------------------------
@contextmanager
def small_disk(path: Path, size: str):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_finetune_onto_a_full_disk_says_so_and_leaves_no_temporary(pngs, tmp_path):
    with small_disk(tmp_path / "disk", "150k") as disk:
        result = cli("finetune", "--data", pngs, "--labels", pngs / "labels.csv", "--out", disk / "run", *TINY)
        out = " ".join(result.output.split())
        assert result.exit_code == 1 and "No space left on device" in out, out
        assert not no_temporaries(disk)


def test_predict_onto_a_full_disk_keeps_what_it_wrote(trained, pngs, tmp_path):
    inputs = tmp_path / "many"
    inputs.mkdir()
    for k in range(300):
        shutil.copy(pngs / "img" / f"im{k % 36:02d}.png", inputs / f"copy_{k:04d}_with_a_long_name_to_fill_the_disk.png")
    with small_disk(tmp_path / "disk", "24k") as disk:
        result = cli("predict", trained, inputs, "--out", disk / "p.csv", "-q", "--batch-size", "8")
        out = " ".join(result.output.split())
        assert result.exit_code == 1 and "No space left on device" in out and "--resume" in out, out
        assert not (disk / "p.csv").exists() and (disk / "p.csv.partial").exists()


# ---- predict: hostile folders -------------------------------------------------------------------
@pytest.fixture
def hostile_folder(pngs, tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for k in range(40):
        shutil.copy(pngs / "img" / f"im{k % 36:02d}.png", folder / f"ok_{k:02d}.png")
    nan = np.ones((28, 28), np.float32)
    nan[0, 0] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(folder / "a_first_batch_inf.nii.gz"))  # sorts first
    nan[0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(folder / "z_last_batch_nan.nii.gz"))  # sorts last
    shutil.copy(pngs / "img" / "im00.png", folder / "renamed_png.dcm")
    (folder / "notes.dicom").write_text("a text file with a DICOM name\n")
    (folder / "README.txt").write_text("patient CD readme\n")
    os.mkfifo(folder / "pipe.dcm")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    return folder


EXPECTED = {
    "a_first_batch_inf.nii.gz": ("error", "0 NaN and 1 infinite"),
    "z_last_batch_nan.nii.gz": ("error", "1 NaN and 0 infinite"),
    "renamed_png.dcm": ("error", "not DICOM despite its name"),
    "notes.dicom": ("error", "not DICOM despite its name"),
    "README.txt": ("skipped", "not a DICOM file"),
    "pipe.dcm": ("skipped", "not a regular file"),
    "dangling.png": ("error", "broken symbolic link"),
}


def test_predict_gives_every_hostile_input_one_row(trained, hostile_folder, tmp_path):
    result = cli("predict", trained, hostile_folder, "--out", tmp_path / "p.csv", "-q", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(by_name) == 40 + len(EXPECTED)  # one row per entry, none doubled
    for name, (status, reason) in EXPECTED.items():
        assert by_name[name]["status"] == status and reason in by_name[name]["reason"], by_name[name]
        assert by_name[name]["prob_lesion"] == ""
    assert all(by_name[f"ok_{k:02d}.png"]["status"] == "ok" for k in range(40))


def test_resume_writes_every_input_exactly_once_whatever_was_left(trained, hostile_folder, tmp_path):
    out = tmp_path / "p.csv"
    assert cli("predict", trained, hostile_folder, "--out", out, "-q").exit_code == 0
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    (tmp_path / "p.csv.partial").write_text("".join(lines[:30]) + lines[30][:17])  # an older, torn partial
    assert cli("predict", trained, hostile_folder, "--out", out, "-q", "--resume").exit_code == 0
    rows = list(csv.DictReader(open(out)))
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in csv.DictReader(full.splitlines()))
    assert not (tmp_path / "p.csv.partial").exists()


def test_a_second_job_on_the_same_output_is_refused(trained, pngs, tmp_path):
    """Two jobs, one --out (e.g. --shard 0/2 and 1/2 given the same file): the second is refused at
    once, across processes, and the first one's table stays whole."""
    from medtransfer.inference.batch import output_lock

    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "medtransfer", "predict", str(trained), str(pngs / "img"), "--out", str(out), "-q",
           "--device", "cpu"]
    with output_lock(out):  # the first job, holding the table
        second = subprocess.run(cmd + ["--shard", "1/2"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "being written by another medtransfer job" in second.stderr, second.stderr
    assert f"pid {os.getpid()}" in second.stderr and "Traceback" not in second.stderr
    assert not out.exists() and not (tmp_path / "p.csv.partial").exists()  # it wrote nothing
    first = subprocess.run(cmd + ["--shard", "0/2"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert len({r["path"] for r in csv.DictReader(open(out))}) == 18 and not (tmp_path / "p.csv.lock").exists()


# ---- bad checkpoints: predict, evaluate, compare, --resume ----------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/medtransfer_pwned",))


def _bad_run(trained: Path, tmp_path: Path, kind: str, name: str = "model.pt") -> Path:
    run = tmp_path / f"bad_{kind}"
    shutil.copytree(trained, run)
    target = run / name
    if kind == "truncated":
        data = (trained / "model.pt").read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        torch.save({"format": "medtransfer-run/1", "x": _Exploit()}, target)
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, target)
    else:
        target.write_text("not a checkpoint at all")
    return run


@pytest.mark.parametrize("kind, pattern", [("truncated", "truncated or corrupt"),
                                           ("pickle", "not a medtransfer checkpoint"),
                                           ("foreign", "not a medtransfer checkpoint"),
                                           ("text", "not a PyTorch file at all")])
@pytest.mark.parametrize("command", ["predict", "evaluate", "compare"])
def test_bad_model_files_get_a_plain_message(trained, pngs, tmp_path, kind, pattern, command):
    run = _bad_run(trained, tmp_path, kind)
    args = {"predict": ["predict", run, pngs / "img", "--out", tmp_path / "p.csv"],
            "evaluate": ["evaluate", run, "--data", pngs, "--labels", pngs / "labels.csv"],
            "compare": ["compare", trained, run, "--data", pngs, "--labels", pngs / "labels.csv"]}[command]
    result = cli(*args)
    assert result.exit_code == 1 and pattern in " ".join(result.output.split()), result.output
    assert not Path("/tmp/medtransfer_pwned").exists()


@pytest.mark.parametrize("kind", ["truncated", "pickle", "text"])
def test_a_bad_last_pt_refuses_resume_plainly(trained, tmp_path, kind):
    run = _bad_run(trained, tmp_path, kind, "last.pt")
    result = cli("finetune", "--resume", run, "-q")
    assert result.exit_code == 1 and ("truncated or corrupt" in result.output or "not a medtransfer" in result.output)


# ---- inspect, weights, segment ------------------------------------------------------------------
def test_inspect_survives_a_hostile_folder(hostile_folder):
    result = cli("inspect", hostile_folder, "--json")
    assert result.exit_code == 0, result.output
    assert cli("inspect", hostile_folder / "missing").exit_code == 1


def test_weights_import_of_a_non_checkpoint_is_refused(tmp_path):
    junk = tmp_path / "resnet18-f37072fd.pth"
    junk.write_bytes(b"\x00" * 1000)
    result = cli("weights", "import", junk, "--as", "resnet18.tv_in1k")
    assert result.exit_code == 1 and "sha256" in result.output and "download it again" in result.output
    assert cli("weights", "import", tmp_path).exit_code == 2  # a folder without manifest.json


def _seg_folder(root: Path, bad: str = "") -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(4):
        label = np.zeros((16, 16, 8), np.uint8)
        label[4:10, 4:10, 2:6] = 1
        image = (label * 100.0 + 50).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"c{i}.nii.gz"))
    if bad == "truncated":
        raw = (root / "imagesTr" / "c1.nii.gz").read_bytes()
        (root / "imagesTr" / "c1.nii.gz").write_bytes(raw[: len(raw) // 3])
    return root


SEG = ["--encoder", "tiny_cnn.random", "--weights", "none", "-q", "--set", "train.epochs=1",
       "--set", "train.steps_per_epoch=1", "--set", "train.batch_size=2", "--set", "train.patch_size=[16, 16]",
       "--set", "data.spacing=[]", "--set", "data.val_fraction=0.25", "--set", "train.overlay_plots=0"]


def test_segment_train_leaves_out_a_truncated_case_and_refuses_a_used_folder(tmp_path):
    data = _seg_folder(tmp_path / "msd", bad="truncated")
    result = cli("segment", "train", "--data", data, "--out", tmp_path / "run", *SEG)
    assert result.exit_code == 0, result.output
    metrics = __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())
    assert [c["case_id"] for c in metrics["training"]["unreadable_cases"]] == ["c1"]
    again = cli("segment", "train", "--data", data, "--out", tmp_path / "run", *SEG)
    assert again.exit_code == 2 and "not empty" in again.output
    pred = cli("segment", "predict", tmp_path / "run", data / "imagesTr", "--out", tmp_path / "pred", "-q")
    assert pred.exit_code == 1  # the truncated input failed; the others were segmented
    rows = list(csv.DictReader(open(tmp_path / "pred" / "volumes.csv")))
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok", "ok"]


def test_an_unexpected_error_is_a_short_message_and_a_logged_traceback(trained, pngs, tmp_path, monkeypatch):
    import medtransfer.inference.predict as predict_module

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(predict_module, "run_batch", broken)
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "home"))
    result = cli("predict", trained, pngs / "img", "--out", tmp_path / "p.csv")
    assert result.exit_code == 1 and "unexpected error: RuntimeError: something nobody planned for" in result.output
    logs = list((tmp_path / "home" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in " ".join(result.output.split())


def test_a_reader_closing_the_pipe_early_ends_quietly_with_141(tmp_path):
    """``medtransfer ... | head``: a BrokenPipeError is the reader's choice, not a bug to report. The
    command exits 128 + SIGPIPE without a message and without a traceback log (run in its own process:
    the handler points the real stdout at /dev/null)."""
    code = ("import sys; from medtransfer.cli._errors import report_error; "
            "sys.exit(report_error(BrokenPipeError(32, 'Broken pipe')))")
    env = {**os.environ, "MEDTRANSFER_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (141, "", "")
    assert not (tmp_path / "home" / "logs").exists()
