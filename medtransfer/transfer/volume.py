"""Volumes through a 2D backbone: slice-wise and orthogonal-view encoders, and the pooling over slices.

``model.volume_encoder``:

* ``channels`` — the volume's ``D`` slices are the input channels of one 2D pass (the stem's kernels
  tiled over slices; the first round's 2.5D input);
* ``slices`` — the shared 2D backbone sees each slice as an image (``slice_group = 3``: the slice and
  its two neighbours as RGB, the pretrained stem as it is; ``1``: a gray slice, the stem summed);
* ``views`` — the same along the axial, coronal and sagittal directions.

:class:`SliceEncoder` returns one feature vector per slice, ``(N, T, F)`` (``T`` slices of all
views); ``SlicePool`` in front of the head turns them into ``(N, F)``. Splitting the two lets
the feature cache hold the frozen backbone's slice features while the pooling trains with the head.
All slices of a batch go through the backbone in one call (no Python loop over slices), in chunks of
at most ``chunk`` images to bound memory.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtransfer.backbones import LoadReport, WeightSpec, load_backbone
from medtransfer.errors import ConfigError
from medtransfer.options import SlicePooling, VolumeEncoder, look_up_option

VIEW_AXES = {"axial": 1, "coronal": 2, "sagittal": 3}
"""Axis of ``(N, D, H, W)`` along which each view's slices are taken."""


class SliceEncoder(nn.Module):
    """A 2D backbone applied to every slice (or slice triplet) of ``(N, D, H, W)`` volumes.

    Output ``(N, T, F)``: ``T = views × ceil(slices / stride)``, ``F = backbone.num_features``. Each
    slice is given to the backbone exactly as a 2D image would be (same values, no re-scaling); slices
    of the coronal and sagittal views are resized to the axial in-plane size.
    """

    tokens = True
    """Marks an encoder whose output is a set of feature vectors, pooled in front of the head."""

    def __init__(self, image: nn.Module, views: tuple[str, ...] = ("axial",), group: int = 3, stride: int = 1,
                 chunk: int = 256):
        super().__init__()
        if group not in (1, 3):
            raise ConfigError(f"model.slice_group must be 1 (gray slices) or 3 (neighbours as RGB), got {group}.")
        bad = [v for v in views if v not in VIEW_AXES]
        if bad or not views:
            raise ConfigError(f"Unknown view(s) {bad}; choose from {list(VIEW_AXES)}.")
        self.image, self.views, self.group, self.stride, self.chunk = image, tuple(views), group, stride, chunk
        self.num_features = image.num_features
        self.dims = 2

    def slice_images(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(N, D, H, W)`` → ``(N · T, group, H, W)`` slice images and ``T``."""
        if x.ndim != 4:
            raise ValueError(f"a slice encoder takes (N, D, H, W) volumes, got shape {tuple(x.shape)}")
        size = x.shape[-2:]
        per_view = []
        for view in self.views:
            v = x.movedim(VIEW_AXES[view], 1)  # (N, S, a, b): slices along the view's axis
            if self.group == 3:
                p = F.pad(v[:, None], (0, 0, 0, 0, 1, 1), mode="replicate")[:, 0]
                v = torch.stack([p[:, :-2], p[:, 1:-1], p[:, 2:]], dim=2)  # (N, S, 3, a, b)
            else:
                v = v[:, :, None]
            v = v[:, :: self.stride]
            n, s = v.shape[:2]
            v = v.reshape(n * s, self.group, *v.shape[-2:])
            if tuple(v.shape[-2:]) != tuple(size):
                v = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
            per_view.append(v.reshape(n, s, self.group, *size))
        stacked = torch.cat(per_view, dim=1)
        return stacked.reshape(-1, self.group, *size), stacked.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, t = self.slice_images(x)
        feats = torch.cat([self.image(c) for c in images.split(self.chunk)])
        return feats.reshape(x.shape[0], t, -1)


class SlicePool(nn.Module):
    """``(N, T, F)`` slice features → ``(N, F)``.

    ``attention``: each slice vector is layer-normalised, then weighted by gated attention (Ilse et
    al. 2018): ``a = softmax_T(w · (tanh(V h) ⊙ σ(U h)))``; the weights sum to 1 per volume and are
    exposed by :meth:`weights`. ``mean`` / ``max``: over slices, on the layer-normalised vectors.
    """

    def __init__(self, features: int, kind: str = "attention", hidden: int = 64):
        super().__init__()
        self.kind = look_up_option(kind, SlicePooling, "model.slice_pooling")
        self.norm = nn.LayerNorm(features)
        if self.kind is SlicePooling.ATTENTION:
            self.value, self.gate, self.score = nn.Linear(features, hidden), nn.Linear(features, hidden), nn.Linear(hidden, 1)

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(N, T)`` (uniform for ``mean``)."""
        h = self.norm(tokens)
        if self.kind is not SlicePooling.ATTENTION:
            return torch.full(h.shape[:2], 1.0 / h.shape[1], dtype=h.dtype, device=h.device)
        return self.score(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h))).squeeze(-1).softmax(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind is SlicePooling.MAX:
            return self.norm(tokens).amax(dim=1)
        return (self.weights(tokens).unsqueeze(-1) * self.norm(tokens)).sum(dim=1)


def views_of(encoder: str) -> tuple[str, ...]:
    encoder = look_up_option(encoder, VolumeEncoder, "model.volume_encoder")
    return tuple(VIEW_AXES) if encoder is VolumeEncoder.VIEWS else ("axial",)


def is_sliced(model_cfg: Any, backbone_dims: int) -> bool:
    """Whether a run's volumes go through a 2D backbone slice by slice (``slices`` or ``views``)."""
    return backbone_dims == 2 and model_cfg.volume_encoder in (VolumeEncoder.SLICES, VolumeEncoder.VIEWS)


def describe(model_cfg: Any, backbone_dims: int, channels: int) -> str | None:
    """The load report's line on how volumes reach the backbone (None for 2D images and 3D backbones)."""
    if backbone_dims != 2:
        return None
    if is_sliced(model_cfg, backbone_dims):
        views = "axial, coronal and sagittal slices" if model_cfg.volume_encoder == VolumeEncoder.VIEWS \
            else "axial slices"
        unit = "each slice with its two neighbours as RGB" if model_cfg.slice_group == 3 else "each slice as a gray image"
        stride = f", every {model_cfg.slice_stride}th slice" if model_cfg.slice_stride > 1 else ""
        return (f"{model_cfg.volume_encoder}: the 2D backbone sees {views} ({unit}{stride}); "
                f"{model_cfg.slice_pooling} pooling over slices, trained with the head")
    if model_cfg.volume_encoder == VolumeEncoder.CHANNELS and channels > 3:
        return f"channels: the {channels} slices are the input channels of the adapted stem"
    return None


def _kept_stages(wspec: WeightSpec, stages: int) -> int | None:
    """``model.stages`` as a count of kept stages (None: all); -k counts from the end."""
    if stages >= 0:
        return stages or None
    total = getattr(wspec.builder(1), "num_stages", None)
    if total is None:
        raise ConfigError(f"model.stages = {stages}: '{wspec.name}' has no stages to drop; use 0.")
    if total + stages < 1:
        raise ConfigError(f"model.stages = {stages} would drop all {total} stages of '{wspec.name}'.")
    return total + stages


def build_backbone(wspec: WeightSpec, model_cfg: Any, channels: int, weights: str,
                   input_size: int | None = None) -> tuple[nn.Module, LoadReport]:
    """The run's backbone (``model.stages`` kept), wrapped in a :class:`SliceEncoder` when its volumes go
    through the 2D backbone slice by slice; the load report says which encoder and pooling."""
    sliced = is_sliced(model_cfg, wspec.dims)
    stages = _kept_stages(wspec, model_cfg.stages)
    backbone, report = load_backbone(wspec, model_cfg.slice_group if sliced else channels, weights,
                                     input_size=input_size, stages=stages)
    if sliced:
        backbone = SliceEncoder(backbone, views_of(model_cfg.volume_encoder), model_cfg.slice_group,
                                model_cfg.slice_stride)
    report.volume_encoder = describe(model_cfg, wspec.dims, channels)
    return backbone, report


def head_input(backbone: nn.Module, head: nn.Module, pooling: str) -> nn.Module:
    """The head a model puts on ``backbone``: behind a :class:`SlicePool` when the backbone gives slice
    features."""
    if not getattr(backbone, "tokens", False):
        return head
    return nn.Sequential(SlicePool(backbone.num_features, pooling), head)
