"""Feature extractors for every registered architecture.

Each builder is ``builder(in_channels) -> nn.Module`` whose ``forward`` returns pooled features
``(N, num_features)``; parameter names match the upstream checkpoints (torchvision, timm,
MedicalNet, Models Genesis) so weights load by name. Each module has ``num_stages`` and
``truncate(k)`` (keep the first ``k`` stages), and the upstream classifier slot is an
``nn.Identity`` under its upstream name.

Encoders that expose their stage maps (every builder here but DenseNet) share one interface:
``forward_stages(x) -> list[Tensor]`` (the stem's map, then one per kept stage, shallow → deep),
with ``stage_names`` and ``stage_channels`` naming and sizing those maps. Segmentation decoders and
layer-wise learning rates read stages through it instead of probing attributes.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

Builder = Callable[[int], nn.Module]


def _pool(dims: int) -> nn.Module:
    return nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)


def _probe_features(module: nn.Module, dims: int) -> int:
    """Feature size found by a forward pass on a small zero input (used after truncation)."""
    was_training = module.training
    module.eval()
    c = module.in_channels
    x = torch.zeros(1, c, *([64] * dims)) if dims == 2 else torch.zeros(1, c, 32, 32, 32)
    with torch.no_grad():
        n = module(x).shape[1]
    module.train(was_training)
    return n


# ---------------------------------------------------------------------------------------------
# timm


class TimmFeatures(nn.Module):
    """A timm model without its classifier: ``forward`` gives pooled features."""

    supports_3d = False

    def __init__(self, arch: str, in_channels: int):
        super().__init__()
        import timm

        self.arch = arch
        self.in_channels = in_channels
        self.dims = 2
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels)
        self.num_features = self.model.num_features
        self.num_stages = len(self.model.feature_info)
        self._keep: int | None = None

    def truncate(self, stages: int) -> None:
        if stages < self.num_stages:
            self.model.prune_intermediate_layers([stages - 1], prune_norm=True, prune_head=True)
            self._keep = stages - 1
            self.num_features = self.model.feature_info[stages - 1]["num_chs"]

    @property
    def stage_names(self) -> tuple[str, ...]:
        info = self.model.feature_info[: (self._keep + 1 if self._keep is not None else None)]
        return tuple(str(f["module"]) for f in info)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        info = self.model.feature_info[: (self._keep + 1 if self._keep is not None else None)]
        return tuple(int(f["num_chs"]) for f in info)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """timm's intermediate feature maps, one per stage in ``feature_info`` (kept ones only)."""
        indices = list(range(self._keep + 1)) if self._keep is not None else None
        return list(self.model.forward_intermediates(x, indices=indices, intermediates_only=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._keep is None:
            return self.model(x)
        feats = self.model.forward_intermediates(x, indices=[self._keep], intermediates_only=True)[-1]
        return F.adaptive_avg_pool2d(feats, 1).flatten(1)


def timm_builder(arch: str) -> Builder:
    def build(in_channels: int) -> nn.Module:
        return TimmFeatures(arch, in_channels)

    build.__name__ = f"timm_{arch}"
    build.arch = arch  # type: ignore[attr-defined]
    return build


# ---------------------------------------------------------------------------------------------
# torchvision ResNet / DenseNet (2D; inflatable to 3D)


def _last_norm_channels(module: nn.Module) -> int:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return norms[-1].num_features


class _ResNetStages:
    """``forward_stages`` for torchvision-style ResNets (``conv1, bn1, relu, maxpool, layer1..4``)."""

    _stages: int

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem", *(f"layer{i}" for i in range(1, self._stages + 1)))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (self.bn1.num_features, *(_last_norm_channels(getattr(self, f"layer{i}"))  # type: ignore[attr-defined]
                                         for i in range(1, self._stages + 1)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's map (before the max-pool), then each kept ``layer<i>``'s output."""
        x = self.relu(self.bn1(self.conv1(x)))  # type: ignore[attr-defined]
        feats = [x]
        x = self.maxpool(x)  # type: ignore[attr-defined]
        for i in range(1, self._stages + 1):
            x = getattr(self, f"layer{i}")(x)
            feats.append(x)
        return feats


class ResNetFeatures(_ResNetStages, nn.Module):
    """torchvision ResNet trunk with torchvision parameter names (``conv1``, ``layer1`` … ``fc``)."""

    supports_3d = True

    def __init__(self, depth: int, in_channels: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.in_channels = in_channels
        self.dims = 2
        self.conv1 = net.conv1 if in_channels == 3 else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        self.num_features = net.fc.in_features
        self.num_stages = 4
        self._stages = 4

    def truncate(self, stages: int) -> None:
        for i in range(stages + 1, 5):
            setattr(self, f"layer{i}", nn.Identity())
        self._stages = stages
        self.num_features = _probe_features(self, self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self._stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.pool(x).flatten(1))


class DenseNetFeatures(nn.Module):
    """torchvision DenseNet trunk (``features.*``, ``classifier``), as torchxrayvision also names it.

    Stage ``i`` is ``denseblock{i}`` and its ``transition{i}`` (the last one ends with ``norm5``).
    """

    supports_3d = True

    def __init__(self, depth: int, in_channels: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, f"densenet{depth}")(weights=None)
        self.in_channels = in_channels
        self.dims = 2
        self.features = net.features
        if in_channels != 3:
            self.features.conv0 = nn.Conv2d(in_channels, self.features.conv0.out_channels, 7, 2, 3, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Identity()
        self.num_features = net.classifier.in_features
        self.num_stages = 4

    def truncate(self, stages: int) -> None:
        if stages < self.num_stages:
            names = [n for n, _ in self.features.named_children()]
            cut = names.index(f"transition{stages}") + 1
            self.features = nn.Sequential(OrderedDict((n, getattr(self.features, n)) for n in names[:cut]))
            self.num_features = _probe_features(self, self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        return self.classifier(self.pool(x).flatten(1))


def resnet_builder(depth: int) -> Builder:
    b = partial(ResNetFeatures, depth)
    b.__name__ = f"resnet{depth}"  # type: ignore[attr-defined]
    return b


def densenet_builder(depth: int) -> Builder:
    b = partial(DenseNetFeatures, depth)
    b.__name__ = f"densenet{depth}"  # type: ignore[attr-defined]
    return b


# ---------------------------------------------------------------------------------------------
# MedicalNet 3D ResNets (Tencent/MedicalNet models/resnet.py names)


def _downsample_a(x: torch.Tensor, planes: int, stride: int) -> torch.Tensor:
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    pad = out.new_zeros(out.shape[0], planes - out.shape[1], *out.shape[2:])
    return torch.cat([out, pad], dim=1)


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: strided identity, zero-padded channels (MedicalNet type A)."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _downsample_a(x, self.planes, self.stride)


class _BasicBlock3d(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class _Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


MEDICALNET_CONFIGS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int], str, bool]] = {
    # depth: (block, layers, shortcut type, downsample conv bias) — as MONAI's
    # get_medicalnet_pretrained_resnet_args: shortcut A for 18/34, B without bias for 10/50.
    10: (_BasicBlock3d, (1, 1, 1, 1), "B", False),
    18: (_BasicBlock3d, (2, 2, 2, 2), "A", True),
    34: (_BasicBlock3d, (3, 4, 6, 3), "A", True),
    50: (_Bottleneck3d, (3, 4, 6, 3), "B", False),
}


class MedicalNetResNet3d(_ResNetStages, nn.Module):
    """MedicalNet 3D ResNet encoder (layer3/layer4 dilated, stride 1), ``conv_seg`` as the head slot."""

    supports_3d = False

    def __init__(self, depth: int, in_channels: int = 1):
        super().__init__()
        block, layers, self.shortcut_type, self.bias_downsample = MEDICALNET_CONFIGS[depth]
        self.in_channels = in_channels
        self.dims = 3
        self.inplanes = 64
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.conv_seg = nn.Identity()
        self.num_features = 512 * block.expansion
        self.num_stages = 4
        self._stages = 4

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if self.shortcut_type == "A":
                downsample = _ShortcutA(planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=self.bias_downsample),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        layers = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def truncate(self, stages: int) -> None:
        for i in range(stages + 1, 5):
            setattr(self, f"layer{i}", nn.Identity())
        self._stages = stages
        self.num_features = _probe_features(self, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, self._stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.conv_seg(self.pool(x).flatten(1))


def medicalnet_builder(depth: int) -> Builder:
    b = partial(MedicalNetResNet3d, depth)
    b.__name__ = f"medicalnet_resnet{depth}"  # type: ignore[attr-defined]
    return b


# ---------------------------------------------------------------------------------------------
# Models Genesis 3D U-Net encoder (MrGiovanni/ModelsGenesis pytorch/unet3d.py names)


class _LUConv(nn.Module):
    def __init__(self, in_chan: int, out_chan: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_chan, out_chan, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm3d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class _DownTransition(nn.Module):
    def __init__(self, in_channel: int, depth: int):
        super().__init__()
        width = 32 * 2**depth
        self.ops = nn.Sequential(_LUConv(in_channel, width), _LUConv(width, width * 2))
        self.maxpool = nn.MaxPool3d(2)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(x)


class GenesisEncoder3d(nn.Module):
    """Encoder of the Models Genesis 3D U-Net (``down_tr64`` … ``down_tr512``); decoder dropped.

    Uses ``BatchNorm3d`` (running statistics in eval mode) where upstream's ``ContBatchNorm3d``
    always normalises with batch statistics; the tensors are the same.
    """

    supports_3d = False

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.dims = 3
        self.down_tr64 = _DownTransition(in_channels, 0)
        self.down_tr128 = _DownTransition(64, 1)
        self.down_tr256 = _DownTransition(128, 2)
        self.down_tr512 = _DownTransition(256, 3)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.out_tr = nn.Identity()
        self.num_features = 512
        self.num_stages = 4
        self._names = ["down_tr64", "down_tr128", "down_tr256", "down_tr512"]

    def truncate(self, stages: int) -> None:
        for n in self._names[stages:]:
            delattr(self, n)
        self._names = self._names[:stages]
        self.num_features = 64 * 2 ** (stages - 1)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(64 * 2**i for i in range(len(self._names)))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each kept ``down_tr*`` block's output (the max-pool runs between blocks, as upstream)."""
        feats = []
        for i, name in enumerate(self._names):
            x = getattr(self, name).ops(x if i == 0 else F.max_pool3d(x, 2))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, n in enumerate(self._names):
            block = getattr(self, n)
            x = block(x)
            if i < len(self._names) - 1:
                x = block.maxpool(x)
        return self.out_tr(self.pool(x).flatten(1))


def genesis_builder(in_channels: int) -> nn.Module:
    return GenesisEncoder3d(in_channels)


# ---------------------------------------------------------------------------------------------
# Tiny test backbones


class TinyCNN(nn.Module):
    """A 3-stage CNN of ~25k parameters for tests and quick smoke runs (2D or 3D)."""

    def __init__(self, in_channels: int = 1, dims: int = 2, width: int = 16):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.in_channels = in_channels
        self.dims = dims
        self.supports_3d = dims == 2
        self.conv_stem = conv(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(width)
        self.stages = nn.Sequential(
            nn.Sequential(conv(width, width * 2, 3, stride=2, padding=1, bias=False), norm(width * 2), nn.ReLU()),
            nn.Sequential(conv(width * 2, width * 4, 3, stride=2, padding=1, bias=False), norm(width * 4), nn.ReLU()),
        )
        self.pool = _pool(dims)
        self.classifier = nn.Identity()
        self.num_features = width * 4
        self.num_stages = 3

    def truncate(self, stages: int) -> None:
        self.stages = nn.Sequential(*list(self.stages)[: stages - 1])
        self.num_features = self.conv_stem.out_channels * 2 ** (stages - 1)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return ("stem", *(f"stages.{i}" for i in range(len(self.stages))))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.conv_stem.out_channels * 2**i for i in range(len(self.stages) + 1))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = torch.relu(self.bn1(self.conv_stem(x)))
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv_stem(x)))
        return self.classifier(self.pool(self.stages(x)).flatten(1))


def tiny_builder(dims: int) -> Builder:
    def build(in_channels: int) -> nn.Module:
        return TinyCNN(in_channels, dims)

    build.__name__ = f"tiny_cnn{'' if dims == 2 else '3d'}"
    return build
