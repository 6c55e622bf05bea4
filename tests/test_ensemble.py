"""train.ensemble: members on one split, probabilities averaged, one deployable model.pt."""
import csv

import numpy as np
import pytest
import torch
from torch import nn

from conftest import toy_binary_npz
from medtransfer.config import load_config
from medtransfer.run import load_run
from medtransfer.train.finetune import finetune
from medtransfer.transfer import EnsembleModel, task_probabilities


class _Fixed(nn.Module):
    def __init__(self, logits, task, num_classes):
        super().__init__()
        self.logits, self.task, self.num_classes = torch.tensor(logits), task, num_classes

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


@pytest.mark.parametrize("task, k, a, b", [
    ("binary", 2, [2.0], [-1.0]),
    ("multiclass", 3, [2.0, 0.0, -1.0], [0.0, 3.0, 0.0]),
    ("multilabel", 3, [2.0, -2.0, 0.5], [-1.0, 1.0, 0.0]),
    ("ordinal", 3, [1.0, -1.0], [3.0, 0.5]),
])
def test_ensemble_probabilities_are_the_mean_of_the_members(task, k, a, b):
    x = torch.zeros(4, 1, 8, 8)
    members = [_Fixed(a, task, k), _Fixed(b, task, k)]
    ens = EnsembleModel(members)
    got = ens.probabilities(ens(x))
    want = (task_probabilities(task, members[0](x)) + task_probabilities(task, members[1](x))) / 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_ensemble_rejects_mixed_tasks():
    with pytest.raises(ValueError, match="share one task"):
        EnsembleModel([_Fixed([0.0], "binary", 2), _Fixed([0.0, 0.0, 0.0], "multiclass", 3)])


def _probs(csv_path):
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([float(r["prob_1"]) for r in rows])


def test_ensemble_run_averages_members_and_reloads_as_one_model(tmp_path):
    npz = toy_binary_npz(tmp_path / "toy.npz")
    cfg = load_config("general", None, ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
                                        "train.head_epochs=0", "train.finetune_epochs=2", "train.lr=0.01",
                                        "train.ensemble=2"])
    res = finetune(cfg, data=npz, out_dir=tmp_path / "run")
    m = res.metrics
    assert [e["seed"] for e in m["members"]] == [0, 1]
    assert {e["run_dir"] for e in m["members"]} == {str(tmp_path / "run" / "members" / i) for i in "01"}
    assert m["compute"]["device"] == "cpu" and m["compute"]["precision"] == "fp32"
    assert m["adaptation"]["members"] == 2 and m["adaptation"]["parameters"]["trainable"] > 0  # per member
    # The two members differ (different seeds) and the ensemble is their mean, image by image.
    p0, p1 = (_probs(tmp_path / "run" / "members" / i / "predictions_test.csv") for i in "01")
    assert not np.allclose(p0, p1)
    ens = _probs(tmp_path / "run" / "predictions_test.csv")
    np.testing.assert_allclose(ens, (p0 + p1) / 2, atol=1e-5)
    # model.pt rebuilds the ensemble for predict/evaluate.
    run = load_run(tmp_path / "run", "cpu")
    assert isinstance(run.model, EnsembleModel) and len(run.model.members) == 2
    # ... and the reloaded ensemble reproduces the reported test probabilities image by image.
    images = np.load(npz)["test_images"]
    with torch.no_grad():
        x = run.pre.normalize(torch.stack([run.pre.load_npz(a) for a in images]))
        reloaded = run.model.probabilities(run.model(x))[:, 1].numpy()
    np.testing.assert_allclose(reloaded, ens, atol=1e-5)
    assert 0.0 <= m["test"]["auc"] <= 1.0 and "operating_point" in m


def test_resuming_an_ensemble_directory_points_at_its_members(tmp_path):
    from medtransfer.errors import DataError
    from medtransfer.run import RunDirectory

    (tmp_path / "members" / "0").mkdir(parents=True)
    with pytest.raises(DataError, match="ensemble.*members"):
        RunDirectory(tmp_path).load_last()
