"""Weights from every upstream source load from checkpoints written here in that source's exact layout."""
from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from medtransfer.backbones import (
    CheckpointError,
    get_weight_spec,
    load_backbone,
    read_state_dict,
    sha256_file,
)
from medtransfer.errors import WeightsUnavailableError


@pytest.fixture(autouse=True)
def _offline_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEDTRANSFER_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # FileSource paths under ~ resolve here


def _rand_state(module: nn.Module, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, v in module.state_dict().items():
        out[k] = torch.randint(0, 5, v.shape, generator=g) if not v.is_floating_point() else torch.randn(v.shape, generator=g)
    return out


def _assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_torchvision_resnet_layout_classifier_dropped(tmp_path):
    # (upstream) torchvision resnet18 state dict: conv1 … layer4, fc (1000 classes)
    up = torchvision.models.resnet18(weights=None)
    sd = _rand_state(up)
    f = tmp_path / "resnet18-f37072fd.pth"
    torch.save(sd, f)
    model, report = load_backbone(get_weight_spec("resnet18.tv_in1k"), 3, str(f))
    _assert_loaded(model, {k: v for k, v in sd.items() if not k.startswith("fc.")})
    assert sorted(r["key"] for r in report.reinitialised) == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == len(sd) - 2 and not report.adapted


def test_torchvision_densenet_old_key_names_and_missing_bn_counters(tmp_path):
    up = torchvision.models.densenet121(weights=None)
    sd = _rand_state(up)
    # torchvision's published file: 'norm.1.weight' for 'norm1.weight', no num_batches_tracked
    old = OrderedDict()
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        old[k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2.")] = v
    assert any(".norm.1." in k for k in old)
    f = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old, f)
    model, report = load_backbone(get_weight_spec("densenet121.tv_in1k"), 3, str(f))
    expected = {k: (torch.zeros_like(v) if k.endswith("num_batches_tracked") else v)
                for k, v in sd.items() if not k.startswith("classifier.")}
    _assert_loaded(model, expected)
    assert any(r["why"].startswith("not in the checkpoint") for r in report.reinitialised)


def test_timm_hub_safetensors_layout_with_module_prefix_and_1_channel(tmp_path):
    import timm
    from safetensors.torch import save_file

    up = timm.create_model("efficientnet_b0", pretrained=False)
    sd = _rand_state(up)
    f = tmp_path / "model.safetensors"
    save_file(dict(sd), str(f))
    model, report = load_backbone(get_weight_spec("efficientnet_b0.ra_in1k"), 1, str(f))
    got = model.state_dict()
    # the stem is summed over RGB for one channel: the exact sum of the three kernels
    assert torch.equal(got["model.conv_stem.weight"], sd["conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(got["model.blocks.6.0.conv_pwl.weight"], sd["blocks.6.0.conv_pwl.weight"])
    assert [a["key"] for a in report.adapted] == ["model.conv_stem.weight"]
    assert {r["key"] for r in report.reinitialised} == {"model.classifier.weight", "model.classifier.bias"}


def _fake_xrv_classes():
    """Classes with torchxrayvision's import paths, so torch.save pickles the model as xrv does."""
    mod = types.ModuleType("torchxrayvision.models")
    pkg = types.ModuleType("torchxrayvision")
    pkg.models = mod
    classes = {}
    for name, base in (("DenseNet", nn.Module), ("_DenseLayer", nn.Sequential), ("_DenseBlock", nn.ModuleDict),
                       ("_Transition", nn.Sequential)):
        cls = type(name, (base,), {"__module__": "torchxrayvision.models"})
        setattr(mod, name, cls)
        classes[name] = cls
    return pkg, mod, classes


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_torchxrayvision_whole_module_pickle_loads_without_running_its_code(tmp_path, monkeypatch):
    pkg, mod, classes = _fake_xrv_classes()
    monkeypatch.setitem(sys.modules, "torchxrayvision", pkg)
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", mod)
    net = torchvision.models.densenet121(weights=None, num_classes=18)
    net.features.conv0 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    sd = _rand_state(net)
    net.load_state_dict(sd)
    for m in net.modules():
        kind = type(m).__name__
        if kind in ("_DenseLayer", "_Transition", "_DenseBlock"):
            m.__class__ = classes[kind]
    net.__class__ = classes["DenseNet"]
    net.pathologies = list(get_weight_spec("densenet121.xrv_all").label_names)
    net.register_buffer("op_threshs", None)
    f = tmp_path / "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    torch.save(net, f, _use_new_zipfile_serialization=False)  # xrv's files predate the zip format
    monkeypatch.delitem(sys.modules, "torchxrayvision.models")  # loading must not need the package
    monkeypatch.delitem(sys.modules, "torchxrayvision")

    model, report = load_backbone(get_weight_spec("densenet121.xrv_all"), 1, str(f))
    _assert_loaded(model, {k: v for k, v in sd.items() if not k.startswith("classifier.")})
    assert {r["key"] for r in report.reinitialised} == {"classifier.weight", "classifier.bias"}
    spec = get_weight_spec("densenet121.xrv_all")
    assert spec.label_names[:2] == ("Atelectasis", "Consolidation") and len(spec.label_names) == 18


def test_radimagenet_resnet50_sequential_layout(tmp_path):
    base = torchvision.models.resnet50(weights=None)
    backbone = nn.Module()
    backbone.backbone = nn.Sequential(*list(base.children())[:9])  # RadImageNet's PyTorch example
    sd = _rand_state(backbone)
    f = tmp_path / "ResNet50.pt"
    torch.save(sd, f)
    model, report = load_backbone(get_weight_spec("resnet50.radimagenet"), 3, str(f))
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    expected = {}
    for k, v in sd.items():
        i, rest = k.split(".", 2)[1:]
        expected[f"{names[int(i)]}.{rest}"] = v
    _assert_loaded(model, expected)
    assert not report.reinitialised and not report.adapted


def test_radimagenet_missing_file_gives_instructions():
    with pytest.raises(WeightsUnavailableError, match=r"radimagenet\.com.*ResNet50\.pt.*weights import ResNet50\.pt --as resnet50\.radimagenet"):
        load_backbone(get_weight_spec("resnet50.radimagenet"), 3)


@pytest.mark.parametrize("depth", [10, 18])
def test_medicalnet_dataparallel_layout(tmp_path, depth):
    from medtransfer.backbones.builders import MedicalNetResNet3d

    net = MedicalNetResNet3d(depth, 1)
    sd = _rand_state(net)
    # shortcut B (depth 10) has a bias-free 1x1x1 downsample conv; shortcut A (18) has no downsample tensors
    assert ("layer2.0.downsample.0.weight" in sd) == (depth == 10)
    assert "layer2.0.downsample.0.bias" not in sd
    upstream = {f"module.{k}": v for k, v in sd.items()}
    upstream["module.conv_seg.0.weight"] = torch.randn(32, 512, 3, 3, 3)  # MedicalNet's segmentation head
    f = tmp_path / f"resnet_{depth}_23dataset.pth"
    torch.save({"state_dict": upstream, "epoch": 0}, f)
    model, report = load_backbone(get_weight_spec(f"medicalnet_resnet{depth}.23datasets"), 1, str(f))
    _assert_loaded(model, sd)
    assert [r["key"] for r in report.reinitialised] == ["conv_seg.0.weight"]


def test_models_genesis_decoder_discarded(tmp_path):
    from medtransfer.backbones.builders import GenesisEncoder3d

    enc = GenesisEncoder3d(1)
    sd = _rand_state(enc)
    assert tuple(sd["down_tr64.ops.0.conv1.weight"].shape) == (32, 1, 3, 3, 3)
    upstream = {f"module.{k}": v for k, v in sd.items()}
    upstream["module.up_tr256.up_conv.weight"] = torch.randn(512, 512, 2, 2, 2)
    upstream["module.out_tr.final_conv.weight"] = torch.randn(1, 64, 1, 1, 1)
    f = tmp_path / "Genesis_Chest_CT.pt"
    torch.save({"state_dict": upstream}, f)
    model, report = load_backbone(get_weight_spec("models_genesis_unet3d.chest_ct"), 1, str(f))
    _assert_loaded(model, sd)
    assert [d["key"] for d in report.discarded] == ["up_tr256.up_conv.weight"]


def test_prefixes_stripped_only_at_the_start(tmp_path):
    from medtransfer.backbones.builders import TinyCNN

    sd = _rand_state(TinyCNN(1, 2))
    f = tmp_path / "w.pth"
    torch.save({"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}}, f)
    assert set(read_state_dict(f)) == set(sd)
    torch.save({"submodule.weight": torch.ones(1)}, f)
    assert list(read_state_dict(f)) == ["submodule.weight"]


def test_sha256_mismatch_refused(tmp_path, monkeypatch):
    from medtransfer.backbones.builders import TinyCNN

    f = tmp_path / "home" / "weights" / "resnet18.tv_in1k.pth"
    f.parent.mkdir(parents=True)
    torch.save(_rand_state(TinyCNN(1, 2)), f)  # in the cache under the name, but not the registered file
    with pytest.raises(CheckpointError, match=r"sha256 of .* expected f37072fd for 'resnet18.tv_in1k'"):
        load_backbone(get_weight_spec("resnet18.tv_in1k"), 3)


class Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickle_only_checkpoint_refused(tmp_path):
    f = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": Evil()}, f)
    with pytest.raises(CheckpointError, match=r"Refusing to load .*arbitrary Python objects.*safetensors"):
        read_state_dict(f)
    g = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2), g)  # a pickled torch module: tensors come out, no code runs
    assert set(read_state_dict(g)) == {"weight", "bias"}


def test_offline_missing_weight_names_file_and_place(tmp_path, monkeypatch):
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError("network touched while MEDTRANSFER_OFFLINE=1")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(WeightsUnavailableError) as err:
        load_backbone(get_weight_spec("densenet121.xrv_chex"), 1)
    msg = str(err.value)
    assert "MEDTRANSFER_OFFLINE" in msg
    assert "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt" in msg
    assert str(tmp_path / "home" / "weights" / "densenet121.xrv_chex.pt") in msg


def test_cache_and_upstream_cache_sources(tmp_path):
    from medtransfer.backbones.builders import MedicalNetResNet3d

    sd = _rand_state(MedicalNetResNet3d(10, 1))
    cache = tmp_path / "home" / "weights"
    cache.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, cache / "medicalnet_resnet10.23datasets.pth")
    model, report = load_backbone(get_weight_spec("medicalnet_resnet10.23datasets"), 1)
    assert report.source.startswith("cache") and report.sha256 == sha256_file(cache / "medicalnet_resnet10.23datasets.pth")
    _assert_loaded(model, sd)
    # torchvision's own cache (~/.cache/torch/hub/checkpoints) is searched before the URL
    up = tmp_path / "user" / ".cache" / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    up.parent.mkdir(parents=True)
    torch.save(_rand_state(torchvision.models.resnet34(weights=None)), up)
    with pytest.raises(CheckpointError, match="sha256"):  # found there, but random tensors are not the real file
        load_backbone(get_weight_spec("resnet34.tv_in1k"), 3)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
def test_file_saved_by_torchxrayvision_itself_gives_its_features(tmp_path, monkeypatch):
    """With the real package (dev extra): a model xrv builds, pickled whole as its hosted files are,
    loads into the registered DenseNet and computes the same features for the same input."""
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    up = xrv.models.DenseNet(weights=None)  # random weights: building it downloads nothing
    with torch.no_grad():  # BatchNorm statistics away from their defaults, so eval mode is exercised
        for m in up.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    up.pathologies = list(xrv.models.model_urls["all"]["labels"])
    up.register_buffer("op_threshs", torch.rand(18))
    up.eval()
    f = tmp_path / get_weight_spec("densenet121.xrv_all").upstream_file
    torch.save(up, f, _use_new_zipfile_serialization=False)
    x = (torch.rand(2, 1, 64, 64) * 2 - 1) * 1024  # xrv's intensity range
    with torch.no_grad():
        want = up.features2(x)
    for name in [m for m in sys.modules if m == "torchxrayvision" or m.startswith("torchxrayvision.")]:
        monkeypatch.delitem(sys.modules, name)  # loading must not need the package
    model, report = load_backbone(get_weight_spec("densenet121.xrv_all"), 1, str(f))
    model.eval()
    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape == (2, 1024) and want.std() > 0.01
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert {r["key"] for r in report.reinitialised} == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("depth", [10, 18])
def test_medicalnet_layout_matches_the_resnet_monai_loads_medicalnet_files_into(tmp_path, depth):
    """MONAI loads MedicalNet's files strictly into its ResNet (``module.`` stripped), so its keys are
    MedicalNet's: a file written from MONAI's network loads into ours whole, and the undilated part
    (stem, layer1, layer2; MedicalNet dilates layer3/4, MONAI does not) computes the same."""
    from monai.networks.nets import resnet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    torch.manual_seed(depth)
    up = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                           shortcut_type=shortcut, bias_downsample=bias_downsample,
                                           conv1_t_stride=2)
    with torch.no_grad():
        for m in up.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    f = tmp_path / f"resnet_{depth}_23dataset.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in up.state_dict().items()}}, f)
    model, report = load_backbone(get_weight_spec(f"medicalnet_resnet{depth}.23datasets"), 1, str(f))
    _assert_loaded(model, up.state_dict())
    assert not report.reinitialised and not report.adapted
    up.eval(), model.eval()
    x = torch.randn(1, 1, 24, 32, 32)
    with torch.no_grad():
        want = up.layer2(up.layer1(up.maxpool(up.act(up.bn1(up.conv1(x))))))
        got = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
    assert want.std() > 0.01
    torch.testing.assert_close(got, want)
