"""Segmentation networks: skip features of registered encoders, pretrained weights kept, 3D rules."""
from __future__ import annotations

import pytest
import torch

from medtransfer.backbones import get_weight_spec, load_backbone
from medtransfer.errors import ConfigError
from medtransfer.segmentation import build_segmentation_model


def test_tiny_encoders_give_full_resolution_logits_2d_and_3d():
    m2, _ = build_segmentation_model("tiny_cnn.random", dims=2, in_channels=3, num_classes=3, weights="none")
    assert m2.encoder_channels == [16, 32, 64]  # stem 1/2, stage 1/4, stage 1/8
    assert m2(torch.zeros(2, 3, 32, 24)).shape == (2, 3, 32, 24)
    m3, _ = build_segmentation_model("tiny_cnn3d.random", dims=3, in_channels=1, num_classes=2, weights="none")
    assert m3(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_resnet_inflated_to_3d_and_truncated():
    m, report = build_segmentation_model("resnet18.tv_in1k", dims=3, in_channels=1, num_classes=2, weights="none",
                                         stages=2, decoder_channels=[32, 16, 16])
    assert m.encoder_channels == [64, 64, 128]  # conv1, layer1, layer2
    assert m(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_timm_encoder_cannot_be_inflated():
    with pytest.raises(ConfigError, match="cannot be inflated to 3D. Use model.dims=2"):
        build_segmentation_model("efficientnet_lite0.in1k", dims=3, in_channels=1, num_classes=2, weights="none")


def test_pretrained_imagenet_encoder_is_loaded_unchanged():
    """The segmentation encoder holds exactly the ImageNet EfficientNet-Lite0 tensors (pip package, offline)."""
    spec = get_weight_spec("efficientnet_lite0.in1k")
    try:
        reference, _ = load_backbone(spec, 3, "pretrained", stages=4)
    except Exception as exc:  # the pip weights package is absent
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {exc}")
    model, report = build_segmentation_model(spec.name, dims=2, in_channels=3, num_classes=3, stages=4,
                                             decoder_channels=[64, 32, 24, 16])
    assert model.encoder_channels == [16, 24, 40, 112]
    ref = reference.state_dict()
    got = model.backbone.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert report.adapted == [] and not report.missing


class _SignModel(torch.nn.Module):
    """Logits (background, foreground, unused) = (-x, x, -10): foreground where the image is positive."""

    def forward(self, x):
        return torch.cat([-x, x, torch.full_like(x, -10.0)], dim=1)


def test_segment_volume_resamples_to_target_spacing_and_back():
    import numpy as np

    from medtransfer.io import Volume
    from medtransfer.segmentation import segment_volume
    from medtransfer.segmentation.data import resample

    image = -np.ones((12, 10, 6), np.float32)
    image[3:8, 2:6, :] = 1.0  # a block spanning every slice, so z-resampling leaves it exact
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    label, new_affine = resample((image > 0).astype(np.int16), affine, [1.0, 1.0, 1.0], label=True)
    assert label.shape == (12, 10, 11) and np.allclose(np.diag(new_affine)[:3], [1, 1, 1])
    assert set(np.unique(label).tolist()) == {0, 1}  # nearest neighbour: no new label values
    prep = {"spacing": [1.0, 1.0, 1.0], "normalize": "none", "dims": 3, "patch_size": [8, 8, 8],
            "overlap": 0.25, "sw_batch_size": 4}
    mask = segment_volume(_SignModel(), Volume(image, affine), prep)
    assert mask.shape == image.shape
    np.testing.assert_array_equal(mask, (image > 0).astype(np.int16))
