"""Segmentation transfer end to end on tiny synthetic NIfTI and DICOM data, plus the real MSD folder."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from medtransfer.errors import ConfigError
from medtransfer.io import read_seg, read_series
from medtransfer.metrics import evaluate_segmentation
from medtransfer.run import SEG_MODEL_FORMAT as CHECKPOINT_FORMAT
from medtransfer.segmentation import (
    discover_cases,
    load_seg_config,
    predict_segmentation,
    split_cases,
    train_segmentation,
)
from medtransfer.metrics import dice_per_label
from medtransfer.segmentation.data import load_case
from medtransfer.segmentation.writers import write_dicom_seg

# A non-canonical affine (x flipped, anisotropic, translated): predict must give it back unchanged.
AFFINE = np.array([[-1.0, 0, 0, 20.0], [0, 1.0, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])


def _synthetic_case(rng, shape=(16, 16, 8)):
    """Two boxes (labels 1 and 2) whose image intensity is 100 × label, plus noise."""
    label = np.zeros(shape, np.uint8)
    x0, y0 = rng.integers(1, 5, size=2)
    label[x0:x0 + 6, y0:y0 + 5, 2:6] = 1
    label[x0 + 6:x0 + 10, y0:y0 + 5, 2:6] = 2
    image = (label * 100.0 + rng.normal(0, 5, shape) + 50).astype(np.float32)
    return image, label


@pytest.fixture(scope="module")
def msd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("msd")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        image, label = _synthetic_case(rng)
        nib.save(nib.Nifti1Image(image, AFFINE), str(root / "imagesTr" / f"case_{i:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, AFFINE), str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "front", "2": "back"},
        "training": [{"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"}
                     for i in range(6)],
    }))
    return root


TINY = ["train.epochs=2", "train.steps_per_epoch=2", "train.batch_size=4", "train.val_every=2",
        "train.overlay_plots=0",
        "train.freeze_encoder_epochs=1", "data.spacing=[]", "data.val_fraction=0.34", "train.sw_batch_size=8"]


def test_train_predict_2d_via_cli(msd_folder, tmp_path):
    from medtransfer.cli.segment_cmd import segment_app

    run = tmp_path / "run2d"
    res = CliRunner().invoke(segment_app, [
        "train", "--modality", "mri", "--data", str(msd_folder), "--out", str(run), "--encoder", "tiny_cnn.random",
        "--weights", "none", "--quiet", *sum((["--set", s] for s in TINY + ["train.patch_size=[16, 16]", "train.overlay_plots=1"]), []),
    ])
    assert res.exit_code == 0, res.output
    ckpt = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["label_names"] == ["background", "front", "back"]
    assert ckpt["preprocessing"]["normalize"] == "zscore" and ckpt["model"]["in_channels"] == 3
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [h["epoch"] for h in history] == ["1", "2"]
    assert [h["encoder_trainable"] for h in history] == ["True", "True"]  # random encoder: never frozen
    split = {r["case_id"]: r["split"] for r in csv.DictReader(open(run / "split.csv"))}
    assert sorted(split.values()) == ["train"] * 4 + ["val"] * 2
    per_case = list(csv.DictReader(open(run / "segmentation_val.csv")))
    assert sorted(r["case_id"] for r in per_case) == sorted(k for k, v in split.items() if v == "val")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["n_cases"] == 2 and "front" in metrics["val"]["per_label"]
    assert metrics["plots"] == ["plots/overlay_val.png"] and (run / "plots" / "overlay_val.png").is_file()
    assert history[1]["val_dice_mean"] != "" and history[0].get("val_dice_mean", "") == ""  # val_every=2

    out = tmp_path / "pred"
    res = CliRunner().invoke(segment_app, ["predict", str(run), str(msd_folder / "imagesTr" / "case_000.nii.gz"),
                                           str(tmp_path / "missing.nii.gz"), "--out", str(out), "--quiet"])
    assert res.exit_code == 1  # one input failed, the other was still segmented
    rows = list(csv.DictReader(open(out / "volumes.csv")))
    assert [r["status"] for r in rows] == ["ok", "error"] and rows[1]["reason"] == "not found"
    written = nib.load(rows[0]["mask_nifti"])
    np.testing.assert_allclose(written.affine, AFFINE)
    assert written.shape == (16, 16, 8)
    mask = np.asarray(written.dataobj)
    # volumes in mL from the mask on the input grid: voxel = 1 × 1 × 2 mm³
    assert float(rows[0]["volume_ml_front"]) == pytest.approx((mask == 1).sum() * 2.0 / 1000.0)

    # `medtransfer predict` recognises a segmentation run and writes the same masks
    from medtransfer.cli.main import app

    res = CliRunner().invoke(app, ["predict", str(run), str(msd_folder / "imagesTr"), "--out", str(tmp_path / "p2"), "-q"])
    assert res.exit_code == 0, res.output
    rows2 = list(csv.DictReader(open(tmp_path / "p2" / "volumes.csv")))
    assert len(rows2) == len(list((msd_folder / "imagesTr").glob("*.nii.gz"))) and {r["status"] for r in rows2} == {"ok"}


def test_train_predict_3d_with_frozen_encoder_phase(msd_folder, tmp_path):
    cfg = load_seg_config("mri", data={"path": str(msd_folder)}, model={"encoder": "tiny_cnn3d.random", "dims": 3},
                          overrides=TINY + ["train.patch_size=[16, 16, 8]", "model.weights=none"])
    metrics = train_segmentation(cfg, tmp_path / "run3d")
    assert metrics["val"]["n_cases"] == 2
    rows = predict_segmentation(tmp_path / "run3d", [msd_folder / "imagesTr"], tmp_path / "pred3d")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    np.testing.assert_allclose(nib.load(rows[0]["mask_nifti"]).affine, AFFINE)


def test_freeze_then_unfreeze_pretrained_encoder(msd_folder, tmp_path):
    """A 'pretrained' encoder (a saved tiny_cnn checkpoint) is frozen for epoch 1 and trains in epoch 2."""
    from medtransfer.backbones import get_weight_spec

    spec = get_weight_spec("tiny_cnn.random")
    enc = spec.builder(3)
    torch.save(enc.state_dict(), tmp_path / "enc.pt")
    cfg = load_seg_config("mri", data={"path": str(msd_folder)},
                          model={"encoder": "tiny_cnn.random", "weights": str(tmp_path / "enc.pt")},
                          overrides=TINY + ["train.patch_size=[16, 16]", "train.epochs=2"])
    train_segmentation(cfg, tmp_path / "run")
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert [h["encoder_trainable"] for h in history] == ["False", "True"]
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    before = enc.state_dict()["conv_stem.weight"]
    assert not torch.equal(ckpt["state_dict"]["backbone.conv_stem.weight"], before)  # fine-tuned in epoch 2
    # the encoder learning rate is the lower one (lr × encoder_lr_ratio) throughout
    assert float(history[1]["lr_encoder"]) == pytest.approx(float(history[1]["lr_decoder"]) * 0.1)


def _write_ct_series(folder, n=4, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    series_uid = generate_uid()
    for i in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-10.0, -12.0, 2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.Rows = ds.Columns = size
        ds.PixelData = np.full((size, size), 40 * i, dtype="<i2").tobytes()
        ds.save_as(folder / f"im{i}.dcm")


def test_dicom_seg_references_sources_and_reads_back(tmp_path):
    _write_ct_series(tmp_path / "ct")
    vol = read_series(tmp_path / "ct")
    mask = np.zeros(vol.array.shape, np.int16)  # (X=32, Y=32, Z=4)
    mask[3:10, 5:20, 1:3] = 1
    mask[20:25, 2:4, 0] = 2
    path = write_dicom_seg(tmp_path / "seg.dcm", mask, vol, ["background", "liver", "lesion"])
    ds = pydicom.dcmread(path)
    referenced = {item.ReferencedSOPInstanceUID
                  for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(vol.meta["sop_instance_uids"])
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.meta["series_instance_uid"]
    seg = read_seg(path, vol)
    assert [s["label"] for s in seg.segments] == ["liver", "lesion"]
    np.testing.assert_array_equal(seg.label_map(), mask)


def test_predict_dicom_series_writes_seg(msd_folder, tmp_path):
    cfg = load_seg_config("ct", data={"path": str(msd_folder)}, model={"encoder": "tiny_cnn.random", "weights": "none"},
                          overrides=TINY + ["train.patch_size=[32, 32]", "data.window=[0, 300]"])
    train_segmentation(cfg, tmp_path / "run")
    _write_ct_series(tmp_path / "study" / "ct")
    rows = predict_segmentation(tmp_path / "run", [tmp_path / "study"], tmp_path / "pred")
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    vol = read_series(tmp_path / "study" / "ct")
    nii = nib.load(rows[0]["mask_nifti"])
    np.testing.assert_allclose(nii.affine, vol.affine, atol=1e-4)
    mask = np.asarray(nii.dataobj)
    if rows[0]["mask_dicom_seg"]:
        back = read_seg(rows[0]["mask_dicom_seg"], vol)
        names = ["background", "front", "back"]
        remapped = np.zeros_like(mask)
        for s in back.segments:
            remapped[back.masks[back.segments.index(s)] > 0] = names.index(s["label"])
        np.testing.assert_array_equal(remapped, mask)
    else:
        assert not mask.any() and "empty mask" in rows[0]["reason"]


def test_dice_perfect_and_shifted_by_hand():
    true = np.zeros((10, 10, 10), np.int16)
    true[2:6, 2:6, 2:6] = 1  # 64 voxels
    shifted = np.roll(true, 1, axis=0)  # overlap 3×4×4 = 48 → Dice = 2·48 / (64 + 64) = 0.75
    assert dice_per_label(true, true, [1]) == {1: 1.0}
    assert dice_per_label(shifted, true, [1]) == {1: 0.75}
    rows, summary = evaluate_segmentation([("a", true, true, (1, 1, 1)), ("b", shifted, true, (1, 1, 1))],
                                          ["background", "x"], n_boot=0)
    assert [r["dice_x"] for r in rows] == [1.0, 0.75]
    assert summary["per_label"]["x"]["dice"]["mean"] == pytest.approx(0.875)


def test_split_is_seeded_and_case_level():
    ids = [f"c{i}" for i in range(20)]
    a, b = split_cases(ids, 0.2, 0.1, seed=3), split_cases(list(reversed(ids)), 0.2, 0.1, seed=3)
    assert a == b
    assert sorted(a.values()).count("val") == 4 and sorted(a.values()).count("test") == 2
    assert split_cases(ids, 0.2, 0.1, seed=4) != a


def test_config_errors_are_helpful(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'train.epochs'"):
        load_seg_config("mri", overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match="patch_size has 2 entries but model.dims is 3"):
        load_seg_config("mri", overrides=["model.dims=3"])
    with pytest.raises(ConfigError, match="Unknown segmentation modality 'mr'"):
        load_seg_config("mr")
    from medtransfer.cli.segment_cmd import segment_app

    res = CliRunner().invoke(segment_app, ["train", "--data", str(tmp_path), "--set", "model.dimz=3"])
    assert res.exit_code == 2 and "model.dims" in res.output


def test_msd_loader_reads_shared_hippocampus():
    from conftest import shared_data

    cases, names = discover_cases(shared_data("msd_hippocampus"))
    assert len(cases) == 260 and names is None  # the shared copy has no dataset.json
    case = next(c for c in cases if c.case_id == "hippocampus_001")
    vol, label = load_case(case)
    assert label.shape == vol.array.shape and vol.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert set(np.unique(label).tolist()) == {0, 1, 2}


def test_dicom_seg_training_cases_from_shared_liver_folder():
    from conftest import shared_data

    cases, _ = discover_cases(shared_data("ct_liver_seg_dicom"))
    assert len(cases) == 1 and cases[0].kind == "dicom" and len(cases[0].image) == 3
    vol, label = load_case(cases[0])
    assert label.shape == vol.array.shape == (512, 512, 3)
    # per-frame liver pixel counts documented for liver_seg.dcm: 36233 / 35645 / 35220 (frame order may differ)
    assert sorted(label.reshape(-1, 3).sum(0).tolist()) == sorted([36233, 35645, 35220])
