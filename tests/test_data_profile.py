import numpy as np
import pytest

from conftest import shared_data, toy_binary_npz
from medtransfer.data.profile import DataProfile, plan_recipe, profile_npz, recipe_overrides
from medtransfer.errors import DataError


def _npz(path, images_shape, labels):
    n = len(labels)
    arrays = {}
    for s in ("train", "val", "test"):
        arrays[f"{s}_images"] = np.zeros((n, *images_shape), np.uint8)
        arrays[f"{s}_labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "shape, labels, expected",
    [
        ((28, 28), np.array([[0], [1], [1]]), (2, 1, "binary", 2)),
        ((28, 28, 3), np.array([[0], [4], [7]]), (2, 3, "multiclass", 8)),
        ((28, 28, 28), np.array([[0], [1], [0]]), (3, 1, "binary", 2)),
        ((64, 64), np.array([[0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]]), (2, 1, "multilabel", 4)),
    ],
)
def test_profile_reads_the_task_from_the_data(tmp_path, shape, labels, expected):
    p = profile_npz(_npz(tmp_path / "x.npz", shape, labels))
    assert (p.dims, p.channels, p.task, p.n_classes) == expected
    assert p.n_train == len(labels)


def test_profile_rejects_non_binary_label_matrices(tmp_path):
    with pytest.raises(DataError, match="must be 0/1"):
        profile_npz(_npz(tmp_path / "x.npz", (8, 8), np.array([[0, 2], [1, 0]])))


def test_recipe_scales_epochs_to_the_budget(tmp_path):
    small = profile_npz(_npz(tmp_path / "s.npz", (28, 28), np.array([[0], [1]] * 250)))
    big = profile_npz(_npz(tmp_path / "b.npz", (28, 28), np.array([[0], [1]] * 20000)))
    assert "data.size=64" in recipe_overrides(small)
    assert "train.finetune_epochs=12" in recipe_overrides(small)
    assert "train.finetune_epochs=2" in recipe_overrides(big)
    # Whatever the estimate, the run carries a hard wall-clock limit under the 20-minute target.
    assert "train.time_limit_minutes=18" in recipe_overrides(small)
    # Budget left after 12 epochs of a small set goes to ensemble members; a big set gets one model.
    assert plan_recipe(small).members > 1 and "train.ensemble=1" not in recipe_overrides(small)
    assert plan_recipe(big).members == 1 and not any("ensemble" in o for o in recipe_overrides(big))


@pytest.mark.parametrize("profile", [
    DataProfile(2, 1, (28, 28), "binary", 2, 546, 78, 156),
    DataProfile(2, 1, (28, 28), "binary", 2, 4708, 524, 624),
    DataProfile(2, 3, (28, 28), "multiclass", 9, 89996, 10004, 7180),
    DataProfile(2, 1, (128, 128), "multilabel", 14, 78468, 11219, 22433),
    DataProfile(3, 1, (28, 28, 28), "binary", 2, 1188, 98, 298),
    DataProfile(3, 1, (64, 64, 64), "multiclass", 11, 971, 161, 610),
    DataProfile(2, 3, (28, 28), "ordinal", 5, 1080, 120, 400),
])
def test_recipe_estimate_stays_inside_the_budget(profile):
    r = plan_recipe(profile, budget_minutes=12.0)
    assert 2 <= r.finetune_epochs <= 12 and 1 <= r.members <= 5 and 0 < r.train_fraction <= 1
    if r.train_fraction > 0.01:
        assert r.estimated_minutes <= 12.0 + 1e-6
    else:  # validation and test passes alone nearly fill the budget: 1% of the training set, still < 20 min
        assert r.estimated_minutes < 20.0
    if r.members > 1:  # members only once the epochs cap is reached on the whole training set
        assert r.finetune_epochs == 12 and r.train_fraction == 1.0


def test_profile_of_real_medmnist_files():
    breast = profile_npz(shared_data("medmnist", "breastmnist.npz"))
    assert (breast.dims, breast.channels, breast.task, breast.n_train, breast.n_test) == (2, 1, "binary", 546, 156)
    adrenal = profile_npz(shared_data("medmnist", "adrenalmnist3d.npz"))
    assert (adrenal.dims, adrenal.image_shape, adrenal.task) == (3, (28, 28, 28), "binary")


def test_cli_picks_the_recipe_from_the_data(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from medtransfer.cli.main import app

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        y = rng.integers(0, 3, size=(n, 1)).astype(np.uint8)
        x = rng.integers(0, 50, size=(n, 28, 28, 3)).astype(np.uint8)
        for c in range(3):
            x[y[:, 0] == c, 8:20, 8:20, c] += 200
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    npz = tmp_path / "colour3.npz"
    np.savez(npz, **arrays)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["finetune", "--data", str(npz), "--out", str(out), "-q",
                                      "--backbone", "tiny_cnn.random", "--weights", "none",
                                      "--set", "train.finetune_epochs=2", "--set", "train.lr=0.01",
                                      "--set", "train.ensemble=2"])
    assert result.exit_code == 0, result.output
    assert "2D, 3 channel(s), multiclass (3 classes)" in result.output
    assert "ensemble of 2" in result.output and "recipe estimate" in result.output
    assert "stops by 18 min" in result.output
    assert sorted(p.name for p in (out / "members").iterdir()) == ["0", "1"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["modality"] == "general"
    assert cfg["data"]["size"] == 64 and cfg["train"]["head_augment"] is False  # from the recipe
    assert cfg["train"]["finetune_epochs"] == 2  # the user's --set wins over the recipe
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 20 and metrics["test"]["auc"] > 0.8


def test_recipe_selects_on_a_capped_validation_set_only_for_large_files():
    large = DataProfile(2, 1, (28, 28), "multiclass", 8, 165_466, 23_640, 47_280)
    small = DataProfile(2, 1, (28, 28), "binary", 2, 4708, 524, 624)
    assert "data.val_max=5000" in plan_recipe(large).overrides()
    assert not any(o.startswith("data.val_max") for o in plan_recipe(small).overrides())
    # The validation passes it saves go to training: more of the training set than with all 23,640.
    uncapped = DataProfile(2, 1, (28, 28), "multiclass", 8, 165_466, 5_000, 47_280)
    assert plan_recipe(large).train_fraction == pytest.approx(plan_recipe(uncapped).train_fraction)
    assert plan_recipe(large).train_fraction > 0.05


def test_cap_val_keeps_whole_patients_per_class_and_leaves_train_and_test():
    from medtransfer.data.samples import Sample, SampleTable, cap_val

    samples = [Sample("x", int(i % 10 == 0), f"p{i // 2}", "val", i) for i in range(400)]  # 2 images/patient
    samples += [Sample("x", i % 2, f"t{i}", split, i) for split in ("train", "test") for i in range(50)]
    table = cap_val(SampleTable(samples, ["neg", "pos"], "npz"), 100, seed=0)
    val = table.subset("val")
    assert 90 <= len(val) <= 110
    assert {s.label for s in val} == {0, 1}  # the 10% positive class keeps its share
    assert 5 <= sum(s.label for s in val) <= 15
    per_patient = {}
    for s in val:
        per_patient[s.patient_id] = per_patient.get(s.patient_id, 0) + 1
    assert set(per_patient.values()) == {2}  # patients are never split
    assert len(table.subset("train")) == 50 and len(table.subset("test")) == 50
    assert cap_val(table, 0) is table and len(cap_val(table, 10_000).subset("val")) == len(val)


def test_finetune_selects_on_val_max_images_and_tests_on_all(tmp_path):
    from medtransfer.config import load_config
    from medtransfer.train.finetune import finetune

    toy_binary_npz(tmp_path / "toy.npz", (32, 40, 24))
    cfg = load_config("general", None, ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
                                        "train.head_epochs=0", "train.finetune_epochs=1", "data.val_max=10"])
    res = finetune(cfg, data=tmp_path / "toy.npz", out_dir=tmp_path / "run")
    assert res.metrics["val"]["n"] == 10 and res.metrics["test"]["n"] == 24
