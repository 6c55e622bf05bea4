"""Vision transformers (timm ``VisionTransformer`` and ``Eva``) as medtransfer backbones.

:class:`ViTFeatures` wraps a timm ViT built without its classifier, for any input size and any
number of input channels:

* **channels**: the patch embedding is a convolution (``model.patch_embed.proj``), so a 1-channel
  image gets the summed RGB kernels exactly as a CNN stem does (:func:`~medtransfer.backbones.adapt.adapt_input_conv`);
* **size**: the model is built with timm's ``dynamic_img_size`` / ``dynamic_img_pad``: an input whose
  side is not a multiple of the patch is zero-padded (bottom / right, after normalisation) to the
  next multiple, and learned absolute position embeddings are resampled (bicubic, timm's
  ``resample_abs_pos_embed``) from the grid they were trained on to the input's grid at every
  forward; rotary embeddings (DINOv3) need no resampling. :func:`describe_input_grid` says which
  for a given size (the load report records it).

Grad-CAM needs a spatial map: the patch tokens entering the last block pass through
:class:`TokenMap` (an identity on an ``(N, D, h, w)`` map, the registry's ``cam_layer = "token_map"``),
so its forward hook sees a feature map and its backward hook the gradient of the class score through
the last block's attention. The stage interface (``forward_stages``, ``stage_names``,
``stage_channels``) gives one ``(N, D, h, w)`` map per block (timm's ``forward_intermediates``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Builder = Callable[[int], nn.Module]


class TokenMap(nn.Identity):
    """The patch tokens entering the last block as an ``(N, D, h, w)`` map (Grad-CAM's target layer)."""


class ViTFeatures(nn.Module):
    """A timm ViT without its classifier: ``forward`` gives pooled features ``(N, embed_dim)``.

    ``global_pool``: ``token`` (the class token after the final norm, as DINOv2, RAD-DINO, DINOv3 and
    CLIP towers use it) or ``avg`` (mean of the patch tokens). ``timm_kwargs`` go to
    ``timm.create_model`` (e.g. ``init_values`` for layer scale, ``img_size``).
    """

    supports_3d = False

    def __init__(self, arch: str, in_channels: int, global_pool: str = "token", **timm_kwargs: Any):
        super().__init__()
        import timm

        self.arch = arch
        self.in_channels = in_channels
        self.dims = 2
        self.model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels,
                                       global_pool=global_pool, dynamic_img_size=True, dynamic_img_pad=True,
                                       **timm_kwargs)
        self.token_map = TokenMap()
        self.num_features = int(self.model.num_features)
        self.num_stages = len(self.model.blocks)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.native_grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        self.rotary = getattr(self.model, "rope", None) is not None

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> "ViTFeatures":
        """``nn.Module.to_empty``, then the non-persistent buffers (rotary frequencies) computed again: they
        are not in a checkpoint, so a model built on the meta device would otherwise keep garbage there."""
        super().to_empty(device=device, recurse=recurse)
        for module in self.modules():
            if module is not self and hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()
        return self

    def truncate(self, stages: int) -> None:
        """Keep the first ``stages`` blocks (the final norm and pooling stay)."""
        if stages < self.num_stages:
            self.model.blocks = self.model.blocks[:stages]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f"blocks.{i}" for i in range(len(self.model.blocks)))

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (self.num_features,) * len(self.model.blocks)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's patch tokens as an ``(N, D, h, w)`` map (timm's ``forward_intermediates``)."""
        return list(self.model.forward_intermediates(x, indices=len(self.model.blocks), output_fmt="NCHW",
                                                     intermediates_only=True))

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Patch embedding, prefix tokens and position embeddings: ``(tokens, rope, grid)``."""
        m = self.model
        x = m.patch_embed(x)  # (N, h, w, D): dynamic_img_size keeps the grid
        grid = (int(x.shape[1]), int(x.shape[2]))
        out = m._pos_embed(x)
        if isinstance(out, tuple):  # Eva: (tokens, rotary embedding); patch dropout is applied inside
            x, rope = out
        else:
            x, rope = m.patch_drop(out), None
        return m.norm_pre(x), rope, grid

    def _through_token_map(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n = self.model.num_prefix_tokens
        prefix, patches = x[:, :n], x[:, n:]
        fmap = self.token_map(patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid))
        return torch.cat([prefix, fmap.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` + ``forward_head``, with the tokens entering the last block routed
        through :attr:`token_map`."""
        m = self.model
        x, rope, grid = self._embed(x)
        last = len(m.blocks) - 1
        for i, block in enumerate(m.blocks):
            if i == last:
                x = self._through_token_map(x, grid)
            x = block(x) if rope is None else block(x, rope=rope)
        return m.forward_head(m.norm(x))


def vit_builder(arch: str, global_pool: str = "token", **timm_kwargs: Any) -> Builder:
    """``builder(in_channels)`` → :class:`ViTFeatures` of timm's ``arch``."""

    def build(in_channels: int) -> nn.Module:
        return ViTFeatures(arch, in_channels, global_pool, **timm_kwargs)

    build.__name__ = f"vit_{arch}" + "".join(f"_{k}{v}" for k, v in sorted(timm_kwargs.items()))
    build.arch = arch  # type: ignore[attr-defined]
    return build


def describe_input_grid(backbone: nn.Module, size: int | tuple[int, int]) -> str | None:
    """How a ViT backbone adapts to ``size`` px inputs (padding to a multiple of the patch, the
    position-embedding grid); None for other backbones."""
    if not isinstance(backbone, ViTFeatures):
        return None
    h, w = (size, size) if isinstance(size, int) else size
    p = backbone.patch_size
    grid = (math.ceil(h / p), math.ceil(w / p))
    parts = [f"{h} x {w} px inputs in {p} px patches: a {grid[0]} x {grid[1]} token grid"]
    if h % p or w % p:
        parts.append(f"padded to {grid[0] * p} x {grid[1] * p} px (zeros after normalisation, bottom / right; "
                     f"use a multiple of {p} px to avoid padding)")
    native = backbone.native_grid
    if backbone.rotary:
        parts.append("rotary position embeddings: computed for any grid, nothing resampled")
    elif tuple(grid) != native:
        parts.append(f"position embeddings trained on a {native[0]} x {native[1]} grid, resampled "
                     f"(bicubic) to {grid[0]} x {grid[1]} at every forward")
    else:
        parts.append("the grid the position embeddings were trained on (no resampling)")
    return "; ".join(parts)
