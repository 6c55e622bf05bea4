"""Adapting pretrained tensors and networks: input channels, 2D→3D inflation, truncation."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medtransfer.errors import ConfigError

ChannelMap = Sequence[int | Sequence[int] | None]
"""One entry per target channel: a source channel index, a list of source channels to sum, or
``None`` for the mean of all source kernels (e.g. ``[0, 1, 2, None]`` for four MRI sequences)."""

INFLATE_MODES = ("average", "centre")


def _result_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapted kernels keep the checkpoint's dtype, except 16-bit floats: their sums stay float32
    (rounding a sum of bfloat16 kernels back to bfloat16 would lose precision for nothing)."""
    return torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str]:
    """Adapt a first-conv kernel ``(O, I, *k)`` to ``in_channels`` inputs; returns (kernel, how).

    I → 1: sum over input channels (exact for a gray image copied into every channel).
    1 → N: repeat and divide by N.  I → N otherwise: tile the I kernels and scale by I / N, so the
    response to a constant image keeps its magnitude.
    """
    orig = weight.shape[1]
    if orig == in_channels:
        return weight, "unchanged"
    dtype = _result_dtype(weight)
    w = weight.float()
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True).to(dtype), f"summed {orig} input-channel kernels into 1"
    repeat = -(-in_channels // orig)
    w = w.repeat(1, repeat, *([1] * (w.ndim - 2)))[:, :in_channels] * (orig / in_channels)
    return w.to(dtype), f"tiled {orig} input-channel kernels to {in_channels} and scaled by {orig}/{in_channels}"


def map_input_channels(weight: torch.Tensor, channel_map: ChannelMap) -> tuple[torch.Tensor, str]:
    """Build a first-conv kernel for ``len(channel_map)`` inputs from chosen source channels.

    Entry ``i`` names the source kernel(s) used for target channel ``i``. The result is scaled by
    ``I / (number of source kernels used)`` so a constant image keeps the original response
    magnitude (``[0, 1, 2]`` on RGB is the identity; ``[[0, 1, 2]]`` is the RGB→gray sum).
    """
    orig = weight.shape[1]
    w = weight.float()
    kernels, used = [], 0
    for i, entry in enumerate(channel_map):
        if entry is None:
            kernels.append(w.mean(dim=1))
            used += 1
            continue
        idx = [entry] if isinstance(entry, int) else list(entry)
        bad = [j for j in idx if not isinstance(j, int) or not 0 <= j < orig]
        if not idx or bad:
            raise ConfigError(
                f"channel_map[{i}] = {entry!r} is not a source channel: the weights have {orig} input "
                f"channels (0..{orig - 1}). Use an index, a list of indices to sum, or None for their mean."
            )
        kernels.append(w[:, idx].sum(dim=1))
        used += len(idx)
    out = torch.stack(kernels, dim=1) * (orig / used)
    return out.to(_result_dtype(weight)), f"mapped input channels {list(channel_map)} from {orig} and scaled by {orig}/{used}"


def inflate_conv_weight(weight: torch.Tensor, depth: int, mode: str = "average") -> torch.Tensor:
    """Inflate a 2D kernel ``(O, I, kh, kw)`` to 3D ``(O, I, depth, kh, kw)``.

    ``average``: repeat along depth and divide by ``depth`` (I3D): on a volume of identical slices
    the 3D conv reproduces the 2D output away from the depth borders. ``centre``: the 2D kernel at
    the centre slice, zeros elsewhere: it reproduces the 2D output on every slice.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D conv kernel (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if mode == "average":
        return weight.unsqueeze(2).repeat(1, 1, depth, 1, 1) / depth
    if mode == "centre":
        out = weight.new_zeros(weight.shape[0], weight.shape[1], depth, *weight.shape[2:])
        out[:, :, depth // 2] = weight
        return out
    raise ConfigError(f"Unknown inflation mode '{mode}'; choose one of {INFLATE_MODES}.")


def _triple(v):
    return (v[0], *v) if isinstance(v, tuple) else v


def convert_to_3d(module: nn.Module) -> nn.Module:
    """Turn a 2D network into its 3D twin in place: Conv2d→Conv3d (depth kernel = height kernel),
    BatchNorm2d→BatchNorm3d, pooling 2d→3d. Weights are fresh; load (inflated) tensors afterwards.

    Raises :class:`ConfigError` for modules that cannot be converted (e.g. timm's custom layers).
    """
    if not getattr(module, "supports_3d", False):
        raise ConfigError(
            f"{type(module).__name__} cannot be inflated to 3D (it uses 2D-only layers). Inflation works for "
            "the torchvision ResNet/DenseNet and tiny_cnn backbones; or choose a 3D backbone (medicalnet_*, "
            "models_genesis_unet3d)."
        )
    _convert(module)
    module.dims = 3
    return module


def _convert(parent: nn.Module) -> None:
    for name, m in list(parent.named_children()):
        new: nn.Module | None = None
        if isinstance(m, nn.Conv2d):
            new = nn.Conv3d(
                m.in_channels, m.out_channels, _triple(m.kernel_size), _triple(m.stride), _triple(m.padding),
                _triple(m.dilation), m.groups, m.bias is not None, m.padding_mode,
            )
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm3d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        elif isinstance(m, nn.MaxPool2d):
            k, s, p, d = (x if isinstance(x, int) else x[0] for x in (m.kernel_size, m.stride, m.padding, m.dilation))
            new = nn.MaxPool3d(k, s, p, d, ceil_mode=m.ceil_mode)
        elif isinstance(m, nn.AvgPool2d):
            k, s, p = (x if isinstance(x, int) else x[0] for x in (m.kernel_size, m.stride, m.padding))
            new = nn.AvgPool3d(k, s, p, ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            new = nn.AdaptiveAvgPool3d(1)
        elif isinstance(m, nn.AdaptiveMaxPool2d):
            new = nn.AdaptiveMaxPool3d(1)
        if new is not None:
            setattr(parent, name, new)
        else:
            _convert(m)


def truncate(module: nn.Module, stages: int) -> list[str]:
    """Keep only the first ``stages`` stages of a backbone; returns the removed state-dict keys.

    ``module.num_features`` is updated to the truncated feature size.
    """
    if not hasattr(module, "truncate"):
        raise ConfigError(f"{type(module).__name__} does not support truncation.")
    n = module.num_stages
    if not 1 <= stages <= n:
        raise ConfigError(f"stages={stages} is out of range: this backbone has {n} stages (1..{n}).")
    before = list(module.state_dict())
    module.truncate(stages)
    after = set(module.state_dict())
    return [k for k in before if k not in after]
