"""The fine-tuning engine: resume equivalence, optimizer groups, leakage, folds, feature cache."""
import csv
import json

import numpy as np
import pytest
import torch

import medtransfer.train.finetune as ft
from medtransfer.train.classifier import build_optimizer
from medtransfer.utils.device import amp_dtype_for
from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.config import load_config
from medtransfer.errors import DataError
from medtransfer.train.folds import finetune_folds
from medtransfer.transfer import TransferModel, apply_plan, layer_groups

TINY = ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32", "train.lr=0.01",
        "train.head_epochs=1", "train.finetune_epochs=3", "train.layer_lr_ratio=0.1"]


def toy_npz(path, n=(48, 20, 20), size=28, seed=0):
    """A MedMNIST-style file: a bright square means class 1."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        labels = rng.integers(0, 2, size=(k, 1))
        images = rng.integers(0, 60, size=(k, size, size)).astype(np.uint8)
        for i, lab in enumerate(labels[:, 0]):
            if lab:
                images[i, 8:20, 8:20] = 230
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return toy_npz(tmp_path_factory.mktemp("toy") / "toy.npz")


@pytest.fixture(scope="module")
def uninterrupted(npz, tmp_path_factory):
    return ft.finetune(load_config("xray", overrides=TINY), data=npz, out_dir=tmp_path_factory.mktemp("a") / "run")


def test_history_and_learning_rates_of_the_recipe(uninterrupted):
    rows = list(csv.DictReader(open(uninterrupted.run_dir / "history.csv")))
    assert [r["phase"] for r in rows] == ["head", "finetune", "finetune", "finetune"]
    assert float(rows[0]["lr"]) == pytest.approx(0.01)  # head phase at lr, no schedule yet
    # cosine over 3 epochs × 3 steps: after 3 steps 0.5·(1 + cos(π/3)) = 0.75, after 9 steps 0
    assert [float(r["lr"]) for r in rows[1:]] == pytest.approx([0.0075, 0.0025, 0.0], abs=1e-9)
    last = torch.load(uninterrupted.run_dir / "last.pt", map_location="cpu", weights_only=True)
    groups = last["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["stem", "stages.0", "stages.1", "head"]
    # discriminative: backbone lr = 0.01 × 0.1, first group × 0.1, geometric in between (then × cosine 0)
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-4, 1e-3 * 0.1 ** 0.5, 1e-3, 1e-2])
    assert uninterrupted.metrics["test"]["auc"] > 0.9  # the square is easy
    assert uninterrupted.metrics["compute"] == {
        "device": "cpu", "precision": "fp32", "channels_last": False, "pinned_memory": False, "world_size": 1,
        "torch": torch.__version__}
    saved = json.loads((uninterrupted.run_dir / "metrics.json").read_text())
    assert saved["compute"] == uninterrupted.metrics["compute"]


@pytest.mark.parametrize("amp, device, bf16, want", [
    ("auto", "cpu", True, None),                 # CPU always trains in fp32
    ("bf16", "cpu", True, None),
    ("auto", "cuda", True, torch.bfloat16),      # Ampere and newer: bf16, no loss scaling
    ("auto", "cuda", False, torch.float16),      # older GPUs: fp16 with a GradScaler
    ("bf16", "cuda", False, torch.bfloat16),     # an explicit choice is kept
    ("fp16", "cuda", True, torch.float16),
    ("off", "cuda", True, None),
])
def test_mixed_precision_choice(amp, device, bf16, want):
    assert amp_dtype_for(amp, torch.device(device), bf16_supported=bf16) is want


def test_optimizer_groups_hold_the_layer_groups_by_identity_after_unfreezing():
    cfg = load_config("xray", overrides=TINY)
    backbone, _ = load_backbone(get_weight_spec("tiny_cnn.random"), 1, "none")
    model = TransferModel(backbone, 2)
    opt = build_optimizer(model, cfg)
    apply_plan(model, "none", "train", unfrozen=1)  # gradual unfreezing: top group only
    groups = layer_groups(model.backbone)
    for pg, g in zip(opt.param_groups, groups):
        assert [id(p) for p in pg["params"]] == [id(p) for p in g.params]
    assert [any(p.requires_grad for p in pg["params"]) for pg in opt.param_groups] == [False, False, True, True]
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 0, 1])
    stem_before = model.backbone.conv_stem.weight.clone()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x).view(-1), y.float()).backward()
    opt.step()
    assert torch.equal(model.backbone.conv_stem.weight, stem_before)  # frozen: no grad, not stepped
    # a rebuilt optimizer (as on resume) maps its state back onto the same parameters
    opt2 = build_optimizer(model, cfg)
    opt2.load_state_dict(opt.state_dict())
    top = model.backbone.stages[1][0].weight
    assert torch.equal(opt2.state[top]["exp_avg"], opt.state[top]["exp_avg"])


def test_a_patient_in_two_user_splits_is_an_error(small_demo, tmp_path):
    rows = list(csv.DictReader(open(small_demo / "labels.csv")))
    pid = rows[0]["patient_id"]
    mine = [r for r in rows if r["patient_id"] == pid]
    assert len(mine) >= 2
    pids = sorted({r["patient_id"] for r in rows})
    for r in rows:  # a clean patient-level split, then one image of the first patient moved to test
        r["split"] = ("train", "val", "test")[pids.index(r["patient_id"]) % 3]
    mine[-1]["split"] = "test" if mine[0]["split"] != "test" else "train"
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match=f"1 patient\\(s\\) appear in more than one split: {pid} \\("):
        ft.finetune(load_config("xray", overrides=TINY), data=small_demo, labels=labels, out_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "model.pt").exists()


def test_folds_are_patient_disjoint_and_summarised(npz, tmp_path):
    cfg = load_config("xray", overrides=TINY[:4] + ["train.head_epochs=1", "train.finetune_epochs=0"])
    res = finetune_folds(cfg, 2, data=npz, out_dir=tmp_path / "cv")
    summary = json.loads((tmp_path / "cv" / "folds.json").read_text())
    vals = [f["val_auc"] for f in summary["folds"]]
    assert summary["val_auc"]["mean"] == pytest.approx(np.mean(vals))
    assert summary["val_auc"]["sd"] == pytest.approx(np.std(vals, ddof=1))
    splits = [json.loads((tmp_path / "cv" / f"fold{i}" / "split_report.json").read_text()) for i in range(2)]
    # 68 train+val images dealt into two folds; the official test split (20) is the same for both
    assert splits[0]["val"]["images"] + splits[1]["val"]["images"] == 68
    assert splits[0]["train"]["images"] == splits[1]["val"]["images"]
    assert [s["test"]["images"] for s in splits] == [20, 20]
    assert res.summary["k"] == 2


def test_feature_cache_trains_the_head_like_the_full_forward(npz, tmp_path):
    """Frozen backbone + no head-phase augmentation: cached features give the same head as the
    full forward pass, epoch for epoch."""
    base = TINY[:4] + ["train.head_epochs=2", "train.finetune_epochs=0", "train.head_augment=false",
                       "model.dropout=0.0"]
    on = ft.finetune(load_config("xray", overrides=base + ["train.feature_cache=on"]), data=npz, out_dir=tmp_path / "on")
    off = ft.finetune(load_config("xray", overrides=base + ["train.feature_cache=off"]), data=npz, out_dir=tmp_path / "off")
    assert [h["val_loss"] for h in on.history] == pytest.approx([h["val_loss"] for h in off.history], rel=1e-4)
    assert on.metrics["feature_cache_seconds"] > 0 and "feature_cache_seconds" not in off.metrics
    assert not (on.run_dir / ".feature_cache").exists()  # the cached features go when the run ends
    a = torch.load(on.run_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(off.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert torch.allclose(a["head.1.weight"], b["head.1.weight"], atol=1e-5)
