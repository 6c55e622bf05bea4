"""MONAI's SegResNet encoder (``monai.networks.nets.segresnet_ds.SegResEncoder``) as a 3D backbone.

CT-FM's feature extractor (``project-lighter/ct_fm_feature_extractor``) is this encoder with
``init_filters=32, blocks_down=(1, 2, 2, 4, 4)``, saved by ``huggingface_hub``'s model mixin with
MONAI's own parameter names (``conv_init``, ``layers.<i>.blocks``, ``layers.<i>.downsample``); the
wrapper keeps MONAI's modules under those names, so the file loads as it is. Its image embedding is
the last level's map, average-pooled (512 features), as CT-FM's feature-extraction script computes it.
MONAI's networks are imported when the encoder is built (importing them costs seconds).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Builder = Callable[[int], nn.Module]


class SegResEncoderFeatures(nn.Module):
    """MONAI's SegResEncoder (3D; its ``conv_init`` and ``layers``) whose ``forward`` gives the last level's
    map, average-pooled; levels are stages (``layers.<i>``: its blocks, whose output ``forward_stages``
    returns, and the downsampling after them)."""

    supports_3d = False

    def __init__(self, in_channels: int = 1, init_filters: int = 32, blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4)):
        super().__init__()
        from monai.networks.nets.segresnet_ds import SegResEncoder

        encoder = SegResEncoder(spatial_dims=3, init_filters=init_filters, in_channels=in_channels,
                                blocks_down=blocks_down)
        self.conv_init, self.layers = encoder.conv_init, encoder.layers
        self.in_channels, self.init_filters = in_channels, init_filters
        self.dims = 3
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Identity()
        self.num_stages = len(blocks_down)
        self.num_features = init_filters * 2 ** (self.num_stages - 1)

    def truncate(self, stages: int) -> None:
        """Keep the first ``stages`` levels (the last kept level's downsampling is dropped too)."""
        if stages < len(self.layers):
            self.layers = self.layers[:stages]
            self.layers[-1]["downsample"] = nn.Identity()
            self.num_features = self.init_filters * 2 ** (stages - 1)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f"layers.{i}" for i in range(len(self.layers)))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.init_filters * 2**i for i in range(len(self.layers)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each level's map before its downsampling (strides 1, 2, 4, 8, 16), as ``SegResEncoder.forward``."""
        x = self.conv_init(x)
        outputs = []
        for level in self.layers:
            x = level["blocks"](x)
            outputs.append(x)
            x = level["downsample"](x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.forward_stages(x)[-1]).flatten(1))


def segresnet_encoder_builder(init_filters: int = 32, blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4)) -> Builder:
    def build(in_channels: int) -> nn.Module:
        return SegResEncoderFeatures(in_channels, init_filters, blocks_down)

    build.__name__ = f"segresnet_encoder3d_{init_filters}_{'-'.join(map(str, blocks_down))}"
    return build
