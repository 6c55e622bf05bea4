import numpy as np
import pytest

from conftest import shared_data
from medtransfer.data.profile import profile_npz, recipe_overrides
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
                                      "--set", "train.finetune_epochs=2", "--set", "train.lr=0.01"])
    assert result.exit_code == 0, result.output
    assert "2D, 3 channel(s), multiclass (3 classes)" in result.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["modality"] == "general"
    assert cfg["data"]["size"] == 64 and cfg["train"]["head_augment"] is False  # from the recipe
    assert cfg["train"]["finetune_epochs"] == 2  # the user's --set wins over the recipe
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 20 and metrics["test"]["auc"] > 0.8
