"""Adaptation on the checkpoint: input channels, 2D→3D inflation, truncation, and the load report."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.backbones import (
    CheckpointError,
    adapt_input_conv,
    get_weight_spec,
    inflate_conv_weight,
    load_backbone,
    map_input_channels,
)
from medtransfer.backbones.builders import TinyCNN
from medtransfer.errors import ConfigError

W = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (O=2, I=3, 2, 2)


def test_rgb_to_one_channel_is_the_exact_sum():
    w, how = adapt_input_conv(W, 1)
    # output 0, top-left tap: 0 + 4 + 8
    assert w.shape == (2, 1, 2, 2) and w[0, 0, 0, 0].item() == 12.0
    assert torch.equal(w, W.sum(1, keepdim=True)) and "summed 3" in how


def test_rgb_to_n_channels_repeats_and_scales_by_3_over_n():
    w, how = adapt_input_conv(W, 4)
    assert w.shape == (2, 4, 2, 2)
    assert torch.allclose(w[:, :3], W * 0.75) and torch.allclose(w[:, 3], W[:, 0] * 0.75)
    assert "3/4" in how
    # kernel mass: 0.75 * (sum of W = 276, plus the repeated channel 0 = 60) = 252
    assert w.sum().item() == 252.0


def test_one_channel_weights_to_three_channels():
    w1 = W[:, :1]
    w, _ = adapt_input_conv(w1, 3)
    assert torch.allclose(w, w1.repeat(1, 3, 1, 1) / 3)
    x = torch.rand(1, 1, 5, 5)
    assert torch.allclose(F.conv2d(x.repeat(1, 3, 1, 1), w), F.conv2d(x, w1), atol=1e-5)


def test_explicit_channel_map_for_four_mri_sequences():
    w, how = map_input_channels(W, [0, 1, 2, None])
    assert w.shape == (2, 4, 2, 2)
    assert torch.allclose(w[:, 0], W[:, 0] * 0.75) and torch.allclose(w[:, 3], W.mean(1) * 0.75)
    w_sum, _ = map_input_channels(W, [[0, 1, 2]])
    assert torch.equal(w_sum, W.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="channel_map\\[1\\] = 5 .* 3 input channels"):
        map_input_channels(W, [0, 5])


def test_channel_map_applied_when_loading(tmp_path):
    from torchvision.models import resnet18

    sd = resnet18(weights=None).state_dict()
    f = tmp_path / "r18.pth"
    torch.save(sd, f)
    model, report = load_backbone(get_weight_spec("resnet18.tv_in1k"), 4, str(f), channel_map=[2, 1, 0, None])
    got = model.conv1.weight.detach()
    assert torch.allclose(got[:, 0], sd["conv1.weight"][:, 2] * 0.75)
    assert report.adapted[0]["key"] == "conv1.weight" and report.adapted[0]["to"] == [64, 4, 7, 7]


@pytest.mark.parametrize("mode", ["average", "centre"])
def test_inflated_conv_reproduces_2d_output_per_slice(mode):
    torch.manual_seed(0)
    conv2d = nn.Conv2d(2, 4, 3, padding=1)
    conv3d = nn.Conv3d(2, 4, 3, padding=1)
    with torch.no_grad():
        conv3d.weight.copy_(inflate_conv_weight(conv2d.weight, 3, mode))
        conv3d.bias.copy_(conv2d.bias)
    img = torch.randn(1, 2, 8, 8)
    vol = img.unsqueeze(2).repeat(1, 1, 6, 1, 1)  # 6 identical slices
    out2d, out3d = conv2d(img), conv3d(vol)
    inner = range(1, 5) if mode == "average" else range(6)
    for d in inner:
        assert torch.allclose(out3d[:, :, d], out2d, atol=1e-5), d
    if mode == "average":  # the zero-padded border slices see only 2 of 3 kernel slices
        assert not torch.allclose(out3d[:, :, 0], out2d, atol=1e-3)


def test_inflated_network_matches_2d_network_on_identical_slices(tmp_path):
    torch.manual_seed(0)
    net2d = TinyCNN(1, 2)
    for m in net2d.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    f = tmp_path / "tiny.pth"
    torch.save(net2d.state_dict(), f)
    spec = get_weight_spec("tiny_cnn.random")
    img = torch.randn(2, 1, 32, 32)
    vol = img.unsqueeze(2).repeat(1, 1, 32, 1, 1)
    net2d.eval()
    ref = net2d(img)
    centre, report = load_backbone(spec, 1, str(f), dims=3, inflate="centre")
    avg, _ = load_backbone(spec, 1, str(f), dims=3, inflate="average")
    with torch.no_grad():
        out_c, out_a = centre.eval()(vol), avg.eval()(vol)
    assert centre.dims == 3 and centre.conv_stem.weight.shape == (16, 1, 3, 3, 3)
    assert torch.allclose(out_c, ref, atol=1e-4)
    assert F.cosine_similarity(out_a, ref).min() > 0.97
    assert (out_a - ref).abs().max() < 0.35 * ref.abs().max()
    assert all("inflated 2D->3D over depth 3 (centre)" in a["how"] for a in report.adapted)
    assert len(report.adapted) == 3


def test_inflation_of_imagenet_resnet_and_refusal_for_timm():
    model, report = load_backbone(get_weight_spec("resnet18.tv_in1k"), 1, "none", dims=3)
    assert model.eval()(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 512)
    with pytest.raises(ConfigError, match="cannot be inflated to 3D"):
        load_backbone(get_weight_spec("efficientnet_lite0.in1k"), 1, "none", dims=3)


@pytest.mark.parametrize(
    "name,stages,features",
    [("resnet18.tv_in1k", 2, 128), ("densenet121.tv_in1k", 1, 128), ("tiny_cnn.random", 2, 32),
     ("efficientnet_lite0.in1k", 3, 40), ("medicalnet_resnet10.23datasets", 3, 256),
     ("models_genesis_unet3d.chest_ct", 2, 128)],
)
def test_truncation_exposes_feature_size(name, stages, features):
    spec = get_weight_spec(name)
    model, _ = load_backbone(spec, 1, "none", stages=stages)
    x = torch.zeros(2, 1, *([32] * spec.dims)) if spec.dims == 2 else torch.zeros(2, 1, 16, 16, 16)
    assert model.num_features == features
    assert model.eval()(x).shape == (2, features)


def test_truncated_load_reports_discarded_stages(tmp_path):
    lite_pip, report_full = load_backbone(get_weight_spec("efficientnet_lite0.in1k"), 3)
    model, report = load_backbone(get_weight_spec("efficientnet_lite0.in1k"), 3, stages=2)
    assert model.num_features == 24
    assert any(d["key"].startswith("model.blocks.6.") for d in report.discarded)
    assert all("truncation (stages=2)" in d["why"] for d in report.discarded)
    full, kept = lite_pip.state_dict(), model.state_dict()
    assert all(torch.equal(kept[k], full[k]) for k in kept)
    assert len(report.loaded) + len(report.discarded) == len(report_full.loaded)
    path = report.save(tmp_path / "load_report.json")
    saved = json.loads(path.read_text())
    assert saved["num_features"] == 24 and saved["discarded"] == report.discarded
    assert "discarded" in report.summary() and "stages=2" in report.summary()


def test_unplanned_shape_mismatch_fails_loudly(tmp_path):
    sd = TinyCNN(1, 2).state_dict()
    sd["stages.0.0.weight"] = torch.zeros(32, 8, 3, 3)  # 8 input channels where 16 are expected
    f = tmp_path / "bad.pth"
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"stages.0.0.weight.*\(32, 8, 3, 3\).*\(32, 16, 3, 3\).*not a planned adaptation"):
        load_backbone(get_weight_spec("tiny_cnn.random"), 1, str(f))
    del sd["stages.0.0.weight"]
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match="1 missing tensors"):
        load_backbone(get_weight_spec("tiny_cnn.random"), 1, str(f))
