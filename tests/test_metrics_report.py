"""Plots, reports and the model card: files written atomically, and numbers traced back by hand."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from medtransfer.metrics import (
    choose_threshold,
    load_history,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_precision_recall,
    plot_reliability,
    plot_roc,
    plot_segmentation_overlay,
    render_model_card,
    roc_curve_band,
    write_classification_report,
    write_model_card,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


def _binary_data(seed: int = 0, n: int = 120):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.2, n))))
    return y, s


# ------------------------------------------------------------------------------------------------- plots
def test_roc_band_data_and_png(tmp_path):
    y, s = _binary_data()
    band = roc_curve_band(y, s, n_boot=100, seed=0)
    curve = np.interp(band["grid"], band["fpr"], band["tpr"])
    inside = (band["tpr_low"] - 1e-9 <= curve) & (curve <= band["tpr_high"] + 1e-9)
    assert inside.mean() > 0.95  # the empirical curve lies within its own pointwise band
    assert band["tpr_low"][-1] == band["tpr_high"][-1] == 1.0 and band["n_skipped"] == 0
    path = plot_roc(tmp_path / "roc.png", y, s, n_boot=50, operating_point={"sensitivity": 0.8,
                                                                            "specificity": 0.7, "threshold": 0.5})
    assert path == tmp_path / "roc.png"
    w, h = _png_size(path)
    assert (w, h) == (600, 540)  # 5 x 4.5 inches at 120 dpi
    assert _no_temp_files(tmp_path)


def test_all_classification_plots_are_valid_pngs(tmp_path):
    y, s = _binary_data(1)
    rng = np.random.default_rng(2)
    yc = rng.integers(0, 3, 60)
    pc = rng.dirichlet([1, 1, 1], 60) * 0.5 + np.eye(3)[yc] * 0.5
    written = [
        plot_precision_recall(tmp_path / "pr.png", y, s),
        plot_reliability(tmp_path / "rel.png", y, s, n_bins=10),
        plot_reliability(tmp_path / "rel_mc.png", yc, pc, task="multiclass"),
        plot_roc(tmp_path / "roc_mc.png", yc, pc, task="multiclass", label_names=["a", "b", "c"]),
        plot_confusion_matrix(tmp_path / "sub" / "cm.png", [[5, 1], [2, 7]], ["neg", "pos"]),
    ]
    for p in written:
        _png_size(p)
    assert _no_temp_files(tmp_path)
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(tmp_path / "bad.png", [[1, 2, 3]], ["a"])


def test_learning_curves_from_csv_and_list(tmp_path):
    rows = [
        {"epoch": 1, "train_loss": 0.9, "val_loss": 1.0, "val_auc": 0.61, "lr": 1e-3},
        {"epoch": 2, "train_loss": 0.7, "val_loss": 0.8, "val_auc": "", "lr": 1e-3},
        {"epoch": 3, "train_loss": 0.5, "val_loss": 0.75, "val_auc": 0.74, "lr": 1e-4},
    ]
    csv_path = tmp_path / "history.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    h = load_history(csv_path)
    np.testing.assert_allclose(h["val_loss"], [1.0, 0.8, 0.75])
    assert np.isnan(h["val_auc"][1]) and h["lr"][2] == 1e-4
    assert load_history(rows)["epoch"].tolist() == [1.0, 2.0, 3.0]
    _png_size(plot_learning_curves(tmp_path / "lc.png", csv_path))
    _png_size(plot_learning_curves(tmp_path / "lc2.png", [{"train_loss": 1.0}, {"train_loss": 0.5}]))
    with pytest.raises(ValueError, match="none of the columns"):
        plot_learning_curves(tmp_path / "lc3.png", [{"foo": 1}])


def test_segmentation_overlay(tmp_path):
    img = np.random.default_rng(0).normal(size=(24, 24, 6))
    true = np.zeros((24, 24, 6), int)
    true[6:14, 6:14, 2:5] = 1
    true[15:20, 8:12, 3] = 2
    pred = np.roll(true, 2, axis=0)
    p = plot_segmentation_overlay(tmp_path / "ov.png", [("c1", img, true, pred), ("c2", img[..., 3], true[..., 3],
                                                                                     pred[..., 3])],
                                  label_names=["bg", "a", "b"])
    _png_size(p)


# ------------------------------------------------------------------------------------------ reports
# Validation: 4 negatives, 3 positives. Youden: t=0.5 gives sens 3/3, spec 3/4 (J=0.75), the best.
VAL_Y = [0, 0, 0, 0, 1, 1, 1]
VAL_P = [0.1, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9]
# Test: on its own, Youden would pick 0.3 (sens 4/4, spec 3/4); the report must apply val's 0.5 instead:
#   positives .9 .55 .5 >= .5 (TP 3), .3 < .5 (FN 1) -> sensitivity 3/4
#   negatives .6 >= .5 (FP 1), .2 .25 .1 (TN 3)      -> specificity 3/4
TEST_Y = [1, 1, 1, 1, 0, 0, 0, 0]
TEST_P = [0.9, 0.55, 0.5, 0.3, 0.2, 0.6, 0.1, 0.25]


def _split(y, p, ids=None):
    p = np.asarray(p)
    return {"y": y, "prob": np.column_stack([1 - p, p]), "patient_ids": ids,
            "paths": [f"img_{i:02d}.dcm" for i in range(len(y))]}


def test_classification_report_applies_val_threshold_to_test(tmp_path):
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.69, "val_auc": 0.7, "lr": 1e-3},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_auc": 0.8, "lr": 1e-4}]
    test_ids = ["A", "A", "B", "C", "D", "D", "E", "F"]
    metrics = write_classification_report(
        tmp_path, val=_split(VAL_Y, VAL_P), test=_split(TEST_Y, TEST_P, test_ids),
        label_names=["normal", "pneumonia"], task="binary", history=history, n_boot=50,
        extra_info={"model_name": "demo", "weights": {"architecture": "resnet18"}},
    )
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    op = on_disk["operating_point"]
    assert op["threshold"] == 0.5 and op["method"] == "youden" and op["chosen_on"] == "val"
    assert op["test"]["threshold"] == 0.5
    assert (op["test"]["tp"], op["test"]["fn"], op["test"]["fp"], op["test"]["tn"]) == (3, 1, 1, 3)
    assert op["test"]["sensitivity"] == 0.75 and op["test"]["specificity"] == 0.75
    assert op["val"]["sensitivity"] == 1.0 and op["val"]["specificity"] == 0.75
    # AUC as plain floats at the documented keys. val: positives .5 .8 .9 vs negatives .1 .2 .3 .6 ->
    # .5 beats 3, .8 beats 4, .9 beats 4 = 11/12.  test: .9 beats 4, .55 3, .5 3, .3 3 = 13/16
    assert isinstance(on_disk["val"]["auc"], float) and on_disk["val"]["auc"] == pytest.approx(11 / 12)
    assert isinstance(on_disk["test"]["auc"], float) and on_disk["test"]["auc"] == pytest.approx(13 / 16)
    assert on_disk["test"]["n"] == 8 and on_disk["test"]["n_patients"] == 6
    lo, hi = on_disk["test"]["auc_ci"]
    assert lo <= on_disk["test"]["auc"] <= hi
    assert on_disk["val"]["n_patients"] is None
    # predictions CSV: columns, probabilities and the label predicted at the val threshold
    with open(tmp_path / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "patient_id", "label", "prob_normal", "prob_pneumonia", "predicted"]
    assert [r["predicted"] for r in rows] == ["1", "1", "1", "0", "0", "1", "0", "0"]
    assert [r["patient_id"] for r in rows] == test_ids
    assert float(rows[1]["prob_pneumonia"]) == 0.55
    assert (tmp_path / "predictions_val.csv").exists()
    for rel in metrics["plots"]:
        _png_size(tmp_path / rel)
    assert {"plots/roc_test.png", "plots/reliability_test.png", "plots/confusion_test.png",
            "plots/learning_curves.png"} <= set(metrics["plots"])
    card = (tmp_path / "model_card.md").read_text()
    assert "not a medical device" in card and "# Model card: demo" in card
    assert "resnet18" in card and "0.5000" in card
    assert "licence**: not recorded" in card  # no weight licence was given: not invented
    assert "positive class**: pneumonia" in card
    assert _no_temp_files(tmp_path)


def test_classification_report_multiclass_without_test(tmp_path):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 45)
    prob = rng.dirichlet([1, 1, 1], 45) * 0.4 + np.eye(3)[y] * 0.6
    metrics = write_classification_report(tmp_path, val={"y": y, "prob": prob, "patient_ids": None, "paths": None},
                                          test=None, label_names=["a", "b", "c"], task="multiclass", n_boot=30)
    assert metrics["test"] is None and metrics["operating_point"]["method"] == "argmax"
    assert isinstance(metrics["val"]["auc"], float)
    with open(tmp_path / "predictions_val.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["predicted"]) for r in rows] == prob.argmax(1).tolist()
    assert "plots/confusion_val.png" in metrics["plots"]
    assert "No held-out test set" in (tmp_path / "model_card.md").read_text()


def test_classification_report_multilabel_thresholds_per_class_and_temperature(tmp_path):
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, (80, 2)).astype(float)
    y[rng.random((80, 2)) < 0.1] = np.nan  # not annotated
    logits = 2.0 * (3.0 * y - 1.5 + rng.normal(0, 1.5, y.shape))  # informative but overconfident
    logits = np.nan_to_num(logits, nan=0.0)
    prob = 1 / (1 + np.exp(-logits))

    def split(sl):
        return {"y": y[sl], "prob": prob[sl], "logits": logits[sl], "patient_ids": None, "paths": None}

    metrics = write_classification_report(tmp_path, val=split(slice(0, 40)), test=split(slice(40, 80)),
                                          label_names=["effusion", "nodule"], task="multilabel", n_boot=20)
    thr = metrics["operating_point"]["threshold"]
    for c, name in enumerate(["effusion", "nodule"]):
        known = ~np.isnan(y[:40, c])
        assert thr[name] == choose_threshold(y[:40][known, c], prob[:40][known, c])
    with open(tmp_path / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["pred_nodule"]) for r in rows] == (prob[40:, 1] >= thr["nodule"]).astype(int).tolist()
    assert [r["label_effusion"] for r in rows][:5] == ["" if np.isnan(v) else str(int(v)) for v in y[40:45, 0]]
    calib = metrics["calibration"]
    assert calib["temperature"] > 1.0  # overconfident logits are softened
    assert calib["ece_test_after_temperature"] < calib["ece_test"]
    assert "plots/roc_test.png" in metrics["plots"]


def test_classification_report_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="one column per label name"):
        write_classification_report(tmp_path, val=_split(VAL_Y, VAL_P), test=None,
                                    label_names=["a", "b", "c"], task="binary")
    bad = _split(VAL_Y, VAL_P)
    bad["patient_ids"] = ["x"]
    with pytest.raises(ValueError, match="patient_ids"):
        write_classification_report(tmp_path, val=bad, test=None, label_names=["a", "b"], task="binary")


def test_model_card_from_info_only(tmp_path):
    info = {
        "model_name": "cxr-pneumonia",
        "task": "binary",
        "label_names": ["normal", "pneumonia"],
        "data": {"source": "PneumoniaMNIST", "splits": {"train": {"n_patients": 4708, "n_images": 4708}}},
        "weights": {"architecture": "tf_efficientnet_lite0", "licence": "Apache-2.0"},
        "metrics": {"test": {"n": 624, "n_patients": 40, "auc": 0.94, "auc_ci": [0.92, 0.96]}},
        "limitations": ["Paediatric patients only."],
    }
    path = write_model_card(tmp_path, info=info)
    assert path == tmp_path / "model_card.md"
    card = path.read_text()
    assert card == render_model_card(info)
    assert "| train | 4708 | 4708 |" in card and "| test | 40 | 624 |" in card
    assert "0.940 (0.920-0.960)" in card and "Apache-2.0" in card
    assert "- Paediatric patients only." in card
    assert "The test set is small (40 patients)" in card
    assert "## Preprocessing\n\nnot recorded" in card
    assert "## Operating point\n\nnot recorded" in card and "## Calibration\n\nnot recorded" in card
    empty = render_model_card({})
    assert empty.count("not recorded") >= 8 and "not a medical device" in empty
