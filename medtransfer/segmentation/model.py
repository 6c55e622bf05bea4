"""U-Net-style segmentation networks on any registered encoder, in 2D (slice-wise, 2.5D) or 3D.

The encoder is a registered backbone (:func:`medtransfer.backbones.load_backbone`: pretrained
weights, channel adaptation, 2D→3D inflation); :func:`encoder_features` reads its stage outputs as
skip features. The decoder is built from MONAI's ``TwoConv`` blocks (the BasicUNet block): each
step upsamples to the next skip's grid, concatenates and convolves, then a last step returns to
the input grid and a 1×1 convolution gives the class logits. The model exposes ``backbone`` and
``head`` like :class:`~medtransfer.transfer.model.TransferModel`, so the transfer plan (freezing,
BatchNorm policy) applies to the encoder unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.errors import ConfigError

SUPPORTED_ENCODERS = "timm models, torchvision ResNet, MedicalNet ResNet, Models Genesis, I3ResNet, tiny_cnn"


def encoder_features(backbone: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Stage outputs of ``backbone`` for ``x``, shallow → deep (each at its own resolution): the
    backbones' shared ``forward_stages`` interface (see :mod:`medtransfer.backbones.builders`)."""
    forward_stages = getattr(backbone, "forward_stages", None)
    if forward_stages is None:
        raise ConfigError(
            f"No skip-feature adapter for the backbone {type(backbone).__name__}; segmentation supports "
            f"{SUPPORTED_ENCODERS}. Choose another encoder with --encoder (see 'medtransfer backbones')."
        )
    return list(forward_stages(x))


def _interp_mode(dims: int) -> str:
    return "bilinear" if dims == 2 else "trilinear"


class UNetDecoder(nn.Module):
    """Decoder over skip features of any resolutions (MONAI ``TwoConv`` blocks) + a 1×1 conv head."""

    def __init__(self, dims: int, encoder_channels: Sequence[int], decoder_channels: Sequence[int],
                 num_classes: int, norm: str | tuple = "batch"):
        super().__init__()
        from monai.networks.nets.basic_unet import TwoConv

        self.dims = dims
        chans = list(encoder_channels)
        n_blocks = len(chans)  # one block per skip + one back to the input grid
        dec = list(decoder_channels)[-n_blocks:]
        dec = [dec[0]] * (n_blocks - len(dec)) + dec
        act = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
        blocks = []
        prev = chans[-1]
        skips = chans[:-1][::-1] + [0]
        for skip, out in zip(skips, dec):
            blocks.append(TwoConv(dims, prev + skip, out, act, norm, bias=True))
            prev = out
        self.blocks = nn.ModuleList(blocks)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.out = conv(prev, num_classes, kernel_size=1)

    def forward(self, feats: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = feats[-1]
        skips = feats[:-1][::-1]
        mode = _interp_mode(self.dims)
        for i, block in enumerate(self.blocks):
            if i < len(skips):
                x = F.interpolate(x, size=skips[i].shape[2:], mode=mode, align_corners=False)
                x = torch.cat([x, skips[i]], dim=1)
            else:
                x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
            x = block(x)
        return self.out(x)


class SegmentationNet(nn.Module):
    """``backbone`` (registered encoder) → ``head`` (:class:`UNetDecoder`) → logits ``(N, K, *spatial)``.

    BatchNorm modules marked fixed by :func:`medtransfer.transfer.plan.apply_plan` stay in
    inference mode across ``train()``.
    """

    def __init__(self, backbone: nn.Module, dims: int, in_channels: int, num_classes: int,
                 decoder_channels: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.dims = dims
        probe = torch.zeros(1, in_channels, *([64] * dims if dims == 2 else [32] * 3))
        was = backbone.training
        backbone.eval()
        with torch.no_grad():
            chans = [f.shape[1] for f in encoder_features(backbone, probe)]
        backbone.train(was)
        self.encoder_channels = chans
        norm = "batch" if dims == 2 else ("instance", {"affine": True})
        self.head = UNetDecoder(dims, chans, decoder_channels, num_classes, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(encoder_features(self.backbone, x), x.shape[2:])

    def train(self, mode: bool = True) -> "SegmentationNet":
        super().train(mode)
        if mode:
            from medtransfer.transfer.plan import restore_frozen_norms

            restore_frozen_norms(self)
        return self


def build_segmentation_model(
    encoder: str, *, dims: int, in_channels: int, num_classes: int, weights: str = "pretrained",
    decoder_channels: Sequence[int] = (128, 64, 32, 16, 16), inflate: str = "average", stages: int = 0,
):
    """Build a :class:`SegmentationNet` (``stages=k``: the encoder's first k stages; 0 or k ≥ its stages = all); returns
    ``(model, load_report)``."""
    from medtransfer.backbones import get_weight_spec, load_backbone

    spec = get_weight_spec(encoder)
    if dims == 3 and spec.dims == 2:
        probe = spec.builder  # timm encoders cannot be inflated; fail early with the reason
        if getattr(probe, "arch", None):
            raise ConfigError(
                f"'{spec.name}' is a timm 2D encoder, which cannot be inflated to 3D. Use model.dims=2 "
                "(slice-wise, 2.5D), a ResNet encoder (inflated) or a 3D encoder (medicalnet_*, tiny_cnn3d)."
            )
    if stages:
        with torch.device("meta"):
            available = spec.builder(in_channels).num_stages
        stages = stages if stages < available else 0  # a preset's k may exceed a small encoder's stages
    backbone, report = load_backbone(spec, in_channels, weights, dims=dims, inflate=inflate, stages=stages or None)
    return SegmentationNet(backbone, dims, in_channels, num_classes, decoder_channels), report
