"""train.head_solver=logistic: the closed-form head equals scikit-learn's regression, C is the validation
argmax, the engine runs it as the head phase, and the recipe gives single-channel volumes the 3D encoder."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

import medtransfer.train.finetune as ft
from medtransfer.config import load_config
from medtransfer.data.profile import PROBE3D_STAGES, DataProfile, plan_recipe, recipe_for_data
from medtransfer.errors import ConfigError
from medtransfer.train.head_solver import C_GRID, fit_logistic_head
from medtransfer.transfer import TransferModel
from medtransfer.transfer.model import build_head


def _features(n, k, dim=12, seed=0, shift=1.5):
    """Class-dependent Gaussian features on very different scales (the scaler must matter)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, size=n)
    x = rng.normal(size=(n, dim)) * np.geomspace(0.01, 100, dim)
    x[:, :k] += shift * np.eye(k)[y] * np.geomspace(0.01, 100, dim)[:k]
    return x.astype(np.float32), y


def _head_probs(head, x, k):
    head.eval()
    with torch.no_grad():
        logits = head(torch.from_numpy(x))
    return torch.sigmoid(logits)[:, 0].numpy() if k == 2 else torch.softmax(logits, 1).numpy()


@pytest.mark.parametrize("k", [2, 4])
def test_the_folded_head_is_sklearns_regression_on_standardised_features(k):
    train, val = _features(300, k), _features(120, k, seed=1)
    head = build_head("linear", 12, 1 if k == 2 else k, 0.3)
    fit = fit_logistic_head(head, "binary" if k == 2 else "multiclass", train, val, balanced=False)
    scaler = StandardScaler().fit(train[0].astype(np.float64))
    ref = LogisticRegression(C=fit.C, max_iter=5000).fit(scaler.transform(train[0].astype(np.float64)), train[1])
    expect = ref.predict_proba(scaler.transform(val[0].astype(np.float64)))
    got = _head_probs(head, val[0], k)
    # float32 head on raw features spanning 1e-2..1e2 (the mean folded into the bias): 1e-4-level rounding
    np.testing.assert_allclose(got, expect[:, 1] if k == 2 else expect, atol=5e-4)
    assert set(fit.scores) == set(C_GRID) and fit.chosen_on == "val"
    assert fit.scores[fit.C] == max(fit.scores.values())


def test_c_is_the_validation_argmax_and_each_score_is_that_fits_val_auc():
    train, val = _features(200, 2, shift=0.4), _features(80, 2, seed=3, shift=0.4)
    x, xv = train[0].astype(np.float64), val[0].astype(np.float64)
    head = build_head("linear", 12, 1, 0.0)
    fit = fit_logistic_head(head, "binary", train, val, balanced=True)
    scaler = StandardScaler().fit(x)
    for c in (C_GRID[0], C_GRID[-1]):
        clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(scaler.transform(x), train[1])
        assert fit.scores[c] == pytest.approx(roc_auc_score(val[1], clf.predict_proba(scaler.transform(xv))[:, 1]))
    assert len(set(round(v, 6) for v in fit.scores.values())) > 1  # the grid is not flat: the choice means something


def test_without_validation_c_comes_from_cross_validation():
    head = build_head("linear", 12, 1, 0.0)
    fit = fit_logistic_head(head, "binary", _features(150, 2), None, balanced=False)
    assert fit.chosen_on.startswith("3-fold") and fit.C in C_GRID


@pytest.mark.parametrize("head, task, match", [("mlp", "binary", "head is Sequential"), ("linear", "multilabel", "task is")])
def test_heads_and_tasks_it_cannot_fit_are_refused(head, task, match):
    with pytest.raises(ConfigError, match=match):
        fit_logistic_head(build_head(head, 12, 1, 0.0), task, _features(50, 2), None, balanced=False)


@pytest.mark.parametrize("extra, match", [
    (["train.head_epochs=3"], "has 3 epochs"),
    (["train.head_epochs=1", "train.feature_cache=off"], "feature_cache is off"),
    (["train.head_epochs=1", "train.head_augment=true"], "head_augment is true"),
    (["train.head_epochs=1", "model.head=mlp"], "model.head is mlp"),
])
def test_config_explains_what_the_logistic_head_needs(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config("general", overrides=["train.head_solver=logistic", "train.head_augment=false", *extra])


def test_the_engine_fits_the_head_once_and_records_it(tmp_path):
    from test_train_engine import toy_npz

    npz = toy_npz(tmp_path / "toy.npz", n=(64, 32, 20))
    cfg = load_config("xray", overrides=["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
                                         "train.head_solver=logistic", "train.head_epochs=1", "train.finetune_epochs=0",
                                         "train.head_augment=false", "model.dropout=0.5"])
    res = ft.finetune(cfg, data=npz, out_dir=tmp_path / "run")
    assert [(h["epoch"], h["phase"]) for h in res.history] == [(1, "head")]
    fit = res.metrics["head_solver"]
    assert fit["solver"] == "logistic" and fit["chosen_on"] == "val"
    # The epoch's validation AUC (the head applied by the engine to the cached val features) is the
    # solver's own score for the C it chose: the fitted weights are the ones the model carries.
    assert res.history[0]["val_auc"] == pytest.approx(fit["auc_by_C"][f"{fit['C']:g}"], abs=1e-4)
    assert res.metrics["best_epoch"] == 1


def test_the_recipe_probes_a_3d_encoder_the_user_asks_for():
    volumes = DataProfile(3, 1, (28, 28, 28), "binary", 2, 1188, 98, 298)
    probe = plan_recipe(volumes, volume_backbone="i3resnet152.merlin_astra")
    o = probe.overrides()
    assert {"model.backbone=i3resnet152.merlin_astra", "model.stages=2", "train.head_solver=logistic",
            "train.head_epochs=1", "train.finetune_epochs=0", "data.size=48"} <= set(o)
    assert "logistic regression" in probe.reasons[0] and probe.members == 1
    load_config("general", overrides=o)  # a valid configuration
    big = DataProfile(3, 1, (64, 64, 64), "multiclass", 11, 971, 161, 610)
    assert "data.size=64" in plan_recipe(big, volume_backbone="x").overrides()
    # Not for: no 3D encoder asked for, multi-label targets, or a feature pass over the budget.
    assert not any("head_solver" in x for x in plan_recipe(volumes).overrides())
    assert plan_recipe(DataProfile(3, 1, (28, 28, 28), "multilabel", 3, 500, 50, 50), volume_backbone="x").head_solver == "sgd"
    huge = DataProfile(3, 1, (128, 128, 128), "binary", 2, 20_000, 2_000, 2_000)
    assert plan_recipe(huge, volume_backbone="x").head_solver == "sgd"
    mid = plan_recipe(DataProfile(3, 1, (128, 128, 128), "binary", 2, 1000, 100, 100), volume_backbone="x")
    assert mid.head_solver == "logistic" and mid.size < 128  # the cube shrinks to fit the budget


def test_the_probe_keeps_the_encoder_up_to_layer2():
    """The recipe's ``model.stages`` cuts the ResNet after ``layer2`` (512 channels, stride 8, 8, 4), the stage
    the stage probe chose on validation, not after ``layer3`` (truncation does not count the stem)."""
    from medtransfer.backbones import get_weight_spec, load_backbone

    model, _ = load_backbone(get_weight_spec("i3resnet152.merlin_astra"), 1, "none", stages=PROBE3D_STAGES)
    assert model.stage_names[-1] == "layer2" and model.num_features == 512
    with torch.no_grad():
        assert model.forward_stages(torch.zeros(1, 1, 16, 16, 16))[-1].shape == (1, 512, 2, 2, 4)


def test_the_cli_plans_the_probe_only_for_a_native_3d_backbone(tmp_path):
    from test_pipeline import _planted_npz

    from medtransfer.cli.main import _native_volume_backbone

    npz = _planted_npz(tmp_path / "v.npz", (16, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))
    assert _native_volume_backbone(None, []) is None  # the preset's 2D backbone
    asked = ["model.backbone=tiny_cnn3d.random", "model.weights=none"]
    backbone = _native_volume_backbone(None, asked)
    cfg, _, plan = recipe_for_data(npz, overrides=asked, volume_backbone=backbone)
    assert (cfg.model.backbone, cfg.train.head_solver, cfg.model.stages) == ("tiny_cnn3d.random", "logistic", PROBE3D_STAGES)
    cfg, _, plan = recipe_for_data(npz, volume_backbone=_native_volume_backbone(None, []))
    assert cfg.train.head_solver == "sgd" and "input channels" in plan.reasons[0]
