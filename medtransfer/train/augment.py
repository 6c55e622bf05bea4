"""Batch augmentation on ``[0, 1]`` images, applied on the device before normalisation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medtransfer.config import AugmentConfig


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random small rotation and zoom, optional left-right flip, brightness and contrast jitter.

    ``x`` is ``(N, C, H, W)`` in ``[0, 1]``; the output stays in ``[0, 1]``. Geometry is sampled
    per image; padding is zero (background). A volume batch ``(N, C, D, H, W)`` gets one in-plane
    transform per volume, the same for all its slices (a rotation about the slice axis).
    """
    if x.ndim == 5:
        n, c, d, h, w = x.shape
        return augment_batch(x.reshape(n, c * d, h, w), cfg, generator).reshape(n, c, d, h, w)
    n = x.shape[0]
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    if cfg.rotate_degrees > 0 or cfg.scale > 0 or cfg.hflip:
        angle = (rand(n) * 2 - 1) * math.radians(cfg.rotate_degrees)
        scale = 1 + (rand(n) * 2 - 1) * cfg.scale
        flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=dev)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, torch.zeros_like(cos)], 1), torch.stack([sin * flip, cos, torch.zeros_like(cos)], 1)],
            1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg.contrast > 0:
        c = 1 + (rand(n, 1, 1, 1) * 2 - 1) * cfg.contrast
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
    if cfg.brightness > 0:
        x = x + (rand(n, 1, 1, 1) * 2 - 1) * cfg.brightness
    return x.clamp(0.0, 1.0)
