"""Inflated 3D ResNet (I3ResNet), the CT image encoder of Merlin (Stanford MIMI Lab) and Astra.

Parameter names are torchvision ResNet's (``conv1``, ``bn1``, ``layer1.0.conv1`` … ``layer4.2.bn3``,
``downsample.0/1``), so the upstream state dict loads by name. The architecture, read off the
upstream checkpoint: Bottleneck v1.5 blocks (the stride sits on the 3×3×3 ``conv2``), ``conv1`` and
``conv3`` 1×1×1, the shortcut a strided 1×1×1 conv + BatchNorm; the stem is ``conv1`` with kernel
(3, 7, 7), stride (1, 2, 2), padding (1, 3, 3), BatchNorm, ReLU and a 3×3×3 max-pool with stride 2
and padding 1; no classifier. Every stage after the first halves all three axes.

Axis order (upstream ``I3ResNet.forward``): the input is ``[B, C, X, Y, Z]`` in RAS (medtransfer's
volume order: column, row, slice), permuted to ``[B, C, Z, X, Y]``; a 1-channel CT is repeated to
the 3 channels the inflated ImageNet stem expects. Here that repetition is folded into the stem: for
a 1-channel input the loader sums ``conv1``'s three input kernels (in float32), the same convolution
at a third of its cost. ``layer4`` then gives ``[B, 2048, Z/16, X/32, Y/32]``
(2048 × 10 × 7 × 7 at 224 × 224 × 160). :meth:`I3ResNet.forward_upstream` returns that map;
:meth:`I3ResNet.forward_stages` returns every stage's map permuted back to the input's axis order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from medtransfer.backbones.contract import InputContractError

I3RESNET_LAYERS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")


class Bottleneck3d(nn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3×3 conv), inflated: 1×1×1, 3×3×3, 1×1×1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * Bottleneck3d.expansion:
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes * Bottleneck3d.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm3d(planes * Bottleneck3d.expansion),
        )
    layers = [Bottleneck3d(inplanes, planes, stride, downsample)]
    layers += [Bottleneck3d(planes * Bottleneck3d.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _to_input_order(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, Z, X, Y]`` (upstream order) → ``[B, C, X, Y, Z]`` (the input's order)."""
    return x.permute(0, 1, 3, 4, 2)


class I3ResNet(nn.Module):
    """The Merlin I3ResNet encoder: ``forward`` gives globally average-pooled features ``(B, num_features)``.

    The stem takes ``in_channels`` (1 for CT in HU); the loader adapts the checkpoint's 3-channel
    ``conv1`` to it (1 channel: the kernels summed, exactly what repeating the channel does).
    """

    supports_3d = False

    def __init__(self, in_channels: int = 1, layers: tuple[int, int, int, int] = I3RESNET_LAYERS[152]):
        super().__init__()
        self.in_channels = in_channels
        self.dims = 3
        self.layers = tuple(layers)
        self.conv1 = nn.Conv3d(in_channels, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            setattr(self, f"layer{i}", _make_layer(inplanes, planes, blocks, 1 if i == 1 else 2))
            inplanes = planes * Bottleneck3d.expansion
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Identity()  # Merlin's EHR classifier slot (not in the checkpoint)
        self.num_stages = 4
        self._stages = 4
        self.num_features = 2048

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Names of the maps :meth:`forward_stages` returns (stem, then each kept ``layer<i>``)."""
        return STAGE_NAMES[: self._stages + 1]

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (64, 256, 512, 1024, 2048)[: self._stages + 1]

    def truncate(self, stages: int) -> None:
        """Keep ``layer1`` … ``layer<stages>``; the feature size becomes that stage's channels."""
        for i in range(stages + 1, 5):
            setattr(self, f"layer{i}", nn.Identity())
        self._stages = stages
        self.num_features = self.stage_channels[-1]

    def _stem_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise InputContractError(
                f"The I3ResNet encoder is 3D: it takes volumes [B, C, X, Y, Z] (5 dims); got shape {tuple(x.shape)} "
                f"({x.ndim} dims). Fix: pass CT volumes (a DICOM series or NIfTI file through the CT preprocessing), "
                "or choose a 2D backbone for 2D images."
            )
        return x.permute(0, 1, 4, 2, 3).to(self.conv1.weight.dtype)

    def _upstream_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps in the upstream axis order ``[B, C, Z', X', Y']``."""
        x = self.relu(self.bn1(self.conv1(self._stem_input(x))))
        feats = [x]
        x = self.maxpool(x)
        for i in range(1, self._stages + 1):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats

    def forward_upstream(self, x: torch.Tensor) -> torch.Tensor:
        """The last kept stage as upstream returns it: ``[B, C, Z', X', Y']`` (``layer4``: Z/16, X/32, Y/32)."""
        return self._upstream_stages(x)[-1]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's map (see :attr:`stage_names`), shallow → deep, in the input's axis order."""
        return [_to_input_order(f) for f in self._upstream_stages(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.forward_upstream(x)).flatten(1).float())


def i3resnet_builder(depth: int = 152) -> Callable[[int], nn.Module]:
    """``builder(in_channels)`` for the registry."""

    def build(in_channels: int) -> nn.Module:
        return I3ResNet(in_channels, I3RESNET_LAYERS[depth])

    build.__name__ = f"i3resnet{depth}"
    return build


@torch.no_grad()
def stem_statistics_fit(model: I3ResNet, x: torch.Tensor) -> dict[str, float]:
    """How well ``x`` (a preprocessed batch ``[B, C, X, Y, Z]``) matches the input the weights'
    first BatchNorm saw in training: per channel, the mean and variance of ``conv1``'s response to
    ``x`` against ``bn1``'s running statistics.

    ``x`` may be thinner than the encoder's grid; the rest of a grid is padding at 0 (air), whose
    response is 0 (``conv1`` has no bias), so the statistics are fitted over the share ``f`` of real
    content (0.2–1). Returns ``mean_error`` (mean |Δmean| in running-sd units), ``log_var_error``
    (mean |log variance ratio|), their ``total`` and the fitted ``content_fraction``; channels with
    (near) zero running variance are left out. Border slices along Z are dropped when there are more
    than two, so that the statistics see real neighbours.
    """
    y = model.conv1(model._stem_input(x)).float()
    if y.shape[2] > 2:
        y = y[:, :, 1:-1]
    m = y.mean(dim=(0, 2, 3, 4))
    q = (y**2).mean(dim=(0, 2, 3, 4))
    rm, rv = model.bn1.running_mean.float(), model.bn1.running_var.float()
    keep = rv > 1e-6
    best: dict[str, float] = {}
    for f in torch.linspace(0.2, 1.0, 81).tolist():
        mf, vf = f * m, f * q - (f * m) ** 2
        mean_err = float(((mf - rm).abs() / rv.sqrt())[keep].mean())
        var_err = float((vf.clamp_min(1e-12) / rv).log().abs()[keep].mean())
        if not best or mean_err + var_err < best["total"]:
            best = {"total": mean_err + var_err, "mean_error": mean_err, "log_var_error": var_err,
                    "content_fraction": f}
    return best


def mean_max_pool(feature_map: torch.Tensor) -> torch.Tensor:
    """``[B, C, *spatial]`` → ``[B, 2C]``: global mean then global max (a linear probe's usual input)."""
    flat = feature_map.flatten(2).float()
    return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)


__all__ = ["Bottleneck3d", "I3ResNet", "I3RESNET_LAYERS", "STAGE_NAMES", "i3resnet_builder", "mean_max_pool",
           "stem_statistics_fit"]
