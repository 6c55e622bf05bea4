"""Contract over every registry entry: metadata complete, builds without weights, forward works."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from medtransfer.backbones import count_parameters, get_weight_spec, list_weights, load_backbone
from medtransfer.backbones.checkpoint import KEY_LAYOUTS
from medtransfer.errors import ConfigError

SPECS = list_weights()
# Entries that share an architecture (e.g. the seven torchxrayvision DenseNets) are built once.
GROUPS: dict[tuple, list[str]] = defaultdict(list)
for _s in SPECS:
    GROUPS[(_s.builder.__name__, _s.dims, _s.first_conv, _s.classifier)].append(_s.name)


def test_registry_covers_the_issue():
    names = {s.name for s in SPECS}
    for arch in ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny",
                 "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "medicalnet_resnet10",
                 "medicalnet_resnet18", "medicalnet_resnet34", "medicalnet_resnet50", "models_genesis_unet3d",
                 "tiny_cnn", "tiny_cnn3d"):
        assert any(n.split(".")[0] == arch for n in names), arch
    for tag in ("all", "chex", "nih", "mimic_ch", "rsna"):
        assert f"densenet121.xrv_{tag}" in names
    assert {"resnet50.radimagenet", "densenet121.radimagenet"} <= names


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_metadata_is_complete(spec):
    assert "." in spec.name and spec.dims in (2, 3)
    assert len(spec.mean) == len(spec.std) == spec.in_channels
    assert spec.intensity and spec.license and spec.description
    assert spec.normalization in ("meanstd", "zscore")
    assert spec.key_layout in KEY_LAYOUTS or spec.key_layout == "by_order"
    if spec.pretrained:
        assert spec.upstream_file or spec.key_layout == "by_order"
    if spec.label_names is not None:
        assert len(spec.label_names) == 18  # torchxrayvision's output order
    d = spec.to_dict()
    assert d["name"] == spec.name and d["sources"] == [s.describe() for s in spec.sources]


def test_xrv_labels_match_torchxrayvision_when_installed():
    xrv_models = pytest.importorskip("torchxrayvision.models")
    for tag in ("all", "nih", "pc", "chex", "rsna", "mimic_nb", "mimic_ch"):
        spec = get_weight_spec(f"densenet121.xrv_{tag}")
        assert list(spec.label_names) == xrv_models.model_urls[tag]["labels"], tag
        assert spec.sources[-1].url == xrv_models.model_urls[tag]["weights_url"]


def test_unknown_name_suggests():
    with pytest.raises(ConfigError, match="Unknown backbone 'densnet121.tv_in1k'. Did you mean 'densenet121.tv_in1k'"):
        get_weight_spec("densnet121.tv_in1k")
    assert get_weight_spec("efficientnet_lite0").name == "efficientnet_lite0.in1k"


def test_count_parameters_of_a_known_network():
    # torchvision resnet18 has 11,689,512 parameters; without fc (512*1000 + 1000) 11,176,512
    assert count_parameters(get_weight_spec("resnet18.tv_in1k")) == 11_176_512


def _build(spec, c):
    """Random initialisation of 60M parameters dominates this file's time on 2 cores: networks over
    15M parameters are built on the meta device and filled cheaply (the builder code still runs)."""
    if count_parameters(spec) < 15_000_000:
        return load_backbone(spec, c, "none")
    with torch.device("meta"):
        model, report = load_backbone(spec, c, "none")
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=g)
        for name, b in model.named_buffers():  # BatchNorm statistics; computed buffers (rotary periods) stay
            if name.endswith("running_var"):
                b.fill_(1)
            elif name.endswith(("running_mean", "num_batches_tracked")):
                b.zero_()
    return model, report


@pytest.mark.parametrize("key", list(GROUPS), ids=["+".join(v) for v in GROUPS.values()])
def test_builds_and_runs_with_1_and_3_channels_and_a_new_head(key):
    spec = get_weight_spec(GROUPS[key][0])
    side = 32 if spec.dims == 2 else 16
    for c in (1, 3):
        model, report = _build(spec, c)
        conv = model.get_submodule(spec.first_conv)
        assert isinstance(conv, nn.Conv2d | nn.Conv3d) and conv.in_channels == c
        assert conv.weight.ndim == spec.dims + 2
        assert isinstance(model.get_submodule(spec.classifier), nn.Identity)
        assert len(report.reinitialised) == len(model.state_dict())
        head = nn.Linear(model.num_features, 5)
        with torch.no_grad():
            out = head(model.eval()(torch.randn(2, c, *([side] * spec.dims))))
        assert out.shape == (2, 5) and torch.isfinite(out).all()
