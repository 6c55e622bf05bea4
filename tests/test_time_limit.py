"""train.time_limit_minutes: epochs and ensemble members that would not fit are cut; the run still
ends with a best-on-validation model.pt and a complete report that says what was cut."""
import json

import numpy as np
import pytest

from conftest import toy_binary_npz
from medtransfer.config import load_config
from medtransfer.run import load_run
from medtransfer.train.finetune import finetune
from medtransfer.transfer import EnsembleModel


def _cfg(*extra):
    return load_config("general", None, ["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32",
                                         "train.head_epochs=0", "train.finetune_epochs=3", "train.lr=0.01",
                                         *extra])


@pytest.mark.parametrize("limit, epochs_run, stopped", [(1e-4, 1, True), (60, 3, False)])
def test_time_limit_stops_fine_tuning_and_keeps_the_best_model(tmp_path, limit, epochs_run, stopped):
    res = finetune(_cfg(f"train.time_limit_minutes={limit}"), data=toy_binary_npz(tmp_path / "toy.npz"),
                   out_dir=tmp_path / "run")
    assert len(res.history) == epochs_run
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["time_limit"] == {"epochs_run": epochs_run, "epochs_planned": 3, "stopped": stopped}
    assert saved["best_epoch"] <= epochs_run and np.isfinite(saved["test"]["auc"])
    assert load_run(tmp_path / "run", "cpu").model is not None


def test_no_time_limit_records_nothing(tmp_path):
    res = finetune(_cfg("train.finetune_epochs=1"), data=toy_binary_npz(tmp_path / "toy.npz"),
                   out_dir=tmp_path / "run")
    assert "time_limit" not in res.metrics and res.metrics["eval_seconds"] > 0


def test_time_limit_trains_no_ensemble_member_that_does_not_fit(tmp_path):
    res = finetune(_cfg("train.ensemble=3", "train.time_limit_minutes=1e-4"), data=toy_binary_npz(tmp_path / "toy.npz"),
                   out_dir=tmp_path / "run")
    m = res.metrics
    assert m["time_limit"] == {"members_trained": 1, "members_planned": 3, "stopped": True}
    assert [e["seed"] for e in m["members"]] == [0]
    assert sorted(p.name for p in (tmp_path / "run" / "members").iterdir()) == ["0"]
    run = load_run(tmp_path / "run", "cpu")
    assert isinstance(run.model, EnsembleModel) and len(run.model.members) == 1
    assert np.isfinite(m["test"]["auc"])
