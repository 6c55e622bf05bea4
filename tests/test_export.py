"""medtransfer export: ONNX and TorchScript with the preprocessing contract, parity with the run's own
predictions on the demo test split, dynamic batch, 2D / 3D / ensembles, and clear refusals."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medtransfer.cli.main import app
from medtransfer.inference import load_run
from medtransfer.inference.export import ExportContractError, OnnxClassifier, export_run, load_torchscript

ort = pytest.importorskip("onnxruntime", reason='ONNX export tests need onnxruntime (pip install "medtransfer[export]")')
pytest.importorskip("onnx", reason='ONNX export tests need onnx (pip install "medtransfer[export]")')

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"


def _test_split(run_dir):
    """The run's test images as the preprocessing leaves them, and the probabilities it reported."""
    run = load_run(run_dir, "cpu")
    with open(run_dir / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = torch.stack([run.pre.load_image(r["path"]) for r in rows]).numpy()
    expected = np.array([[float(r[f"prob_{n}"]) for n in run.label_names] for r in rows])
    return run, x, expected


def test_onnx_reproduces_the_runs_test_predictions(lite0_demo_run, tmp_path):
    _, run_dir = lite0_demo_run
    run, x, expected = _test_split(run_dir)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    clf = OnnxClassifier(tmp_path / "m.onnx")
    np.testing.assert_allclose(clf.predict(x), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(clf.predict(x[:1]), expected[:1], atol=1e-4, rtol=0)  # any batch size
    c = clf.contract
    assert c["input"]["shape"] == ["batch", 1, 128, 128] and c["input"]["window"] == "tags"
    assert c["input"]["mean"] == [0.5] and c["input"]["std"] == [0.5] and c["class_names"] == run.label_names
    assert c["operating_point"]["threshold"] == pytest.approx(run.threshold)
    assert c["backbone"] == "efficientnet_lite0.in1k" and c["task"] == "binary"
    # onnxruntime alone, from the metadata: no medtransfer involved
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["medtransfer"])
    assert meta == c and [d for d in session.get_inputs()[0].shape] == ["batch", 1, 128, 128]


def test_torchscript_reproduces_the_runs_test_predictions(lite0_demo_run, tmp_path):
    _, run_dir = lite0_demo_run
    run, x, expected = _test_split(run_dir)
    module, contract = load_torchscript(export_run(run_dir, tmp_path / "m.ts.pt", "torchscript"))
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert contract["input"]["size"] == 128 and contract["class_names"] == run.label_names
    with pytest.raises((RuntimeError, torch.jit.Error), match=r"does not match the model.s contract \(N, 1, 128, 128\)"):
        module(torch.zeros(2, 1, 64, 64))


@pytest.mark.parametrize("name, shape", [("ensemble2d", (1, 32, 32)), ("cls3d", (1, 16, 16, 16))])
def test_ensembles_and_3d_models_export_as_one_graph(name, shape, tmp_path):
    run = load_run(LEGACY / name, "cpu")
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = run.model.probabilities(run.model(run.pre.normalize(x))).numpy()
    clf = OnnxClassifier(export_run(LEGACY / name, tmp_path / "m.onnx", "onnx"))
    np.testing.assert_allclose(clf.predict(x.numpy()), expected, atol=1e-5, rtol=0)
    module, contract = load_torchscript(export_run(LEGACY / name, tmp_path / "m.ts.pt", "torchscript"))
    np.testing.assert_allclose(module(x).detach().numpy(), expected, atol=1e-5, rtol=0)
    n_members = len(run.model.members) if hasattr(run.model, "members") else 1
    assert clf.contract["ensemble_members"] == contract["ensemble_members"] == n_members
    assert (n_members > 1) == (name == "ensemble2d")
    assert len(clf.session.get_inputs()) == 1 and len(clf.session.get_outputs()) == 1  # one graph


def test_wrong_inputs_are_refused_with_the_contract_in_the_message(tmp_path):
    path = export_run(LEGACY / "cls2d", tmp_path / "m.onnx", "onnx")
    clf = OnnxClassifier(path)
    ok = np.full((2, 1, 32, 32), 0.5, np.float32)
    assert clf.predict(ok).shape == (2, 2)
    for bad, match in ((np.zeros((2, 1, 64, 64), np.float32), r"shape \(2, 1, 64, 64\).*\(N, 1, 32, 32\)"),
                       (np.zeros((1, 32, 32), np.float32), "add the batch axis"),
                       (np.zeros((2, 3, 32, 32), np.float32), "1 channel"),
                       ((ok - 0.5) / 0.5 - 0.5, r"outside the contract's \[0, 1\]"),
                       (np.zeros((2, 1, 32, 32), np.uint8), "not floating point")):
        with pytest.raises(ExportContractError, match=match):
            clf.predict(bad)
    # the graph itself fixes every dimension but the batch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="invalid dimensions"):
        session.run(None, {"image": np.zeros((1, 1, 28, 28), np.float32)})


def test_export_cli_rejects_an_unknown_format(tmp_path):
    result = CliRunner().invoke(app, ["export", str(LEGACY / "cls2d"), "--format", "tflite", "--out",
                                      str(tmp_path / "m.tflite")])
    assert result.exit_code == 2 and "onnx or torchscript" in result.output
    assert not (tmp_path / "m.tflite").exists()
