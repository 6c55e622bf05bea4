"""Batch augmentation on ``[0, 1]`` images, applied on the device before normalisation."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medtransfer.config import AugmentConfig


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random small rotation and zoom, optional left-right flip, brightness and contrast jitter.

    ``x`` is ``(N, C, H, W)`` in ``[0, 1]``; the output stays in ``[0, 1]``. Geometry is sampled
    per image; padding is zero (background). A volume batch ``(N, C, D, H, W)`` gets one transform
    per volume: by default in-plane, the same for all its slices (a rotation about the slice axis);
    with ``cfg.rotate_3d`` a rotation about all three axes, resampled trilinearly. A config without
    any transform returns ``x`` itself.
    """
    if cfg.is_identity:
        return x
    if x.ndim == 5 and not cfg.rotate_3d:
        n, c, d, h, w = x.shape
        return augment_batch(x.reshape(n, c * d, h, w), cfg, generator).reshape(n, c, d, h, w)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(x.device)

    if cfg.rotate_degrees > 0 or cfg.scale > 0 or cfg.hflip:
        theta = _affine(x.shape[0], x.ndim - 2, cfg, rand, x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _jitter_intensity(x, cfg, rand).clamp(0.0, 1.0)


def _affine(n: int, dims: int, cfg: AugmentConfig, rand, device: torch.device) -> torch.Tensor:
    """``(n, dims, dims + 1)`` sampling matrices: rotation(s) up to ``rotate_degrees``, zoom by
    ``1 ± scale``, a left-right flip (the last axis) when ``hflip``; no translation."""
    # one plane for 2D images; for volumes the (W, H), (W, D) and (H, D) planes in turn
    planes = [(0, 1)] if dims == 2 else [(0, 1), (0, 2), (1, 2)]
    angles = [(rand(n) * 2 - 1) * math.radians(cfg.rotate_degrees) for _ in planes]
    scale = 1 + (rand(n) * 2 - 1) * cfg.scale
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=device)
    m = torch.eye(dims, device=device).repeat(n, 1, 1)
    for (i, j), angle in zip(planes, angles):
        r = torch.eye(dims, device=device).repeat(n, 1, 1)
        r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
        m = m @ r
    m = m / scale.view(n, 1, 1)
    m[:, :, 0] *= flip.view(n, 1)  # affine_grid's coordinates are (W, H[, D]): a flip of W
    return torch.cat([m, torch.zeros(n, dims, 1, device=device)], dim=2)


def _jitter_intensity(x: torch.Tensor, cfg: AugmentConfig, rand) -> torch.Tensor:
    """Contrast about each image's mean, then a brightness offset, both per image."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if cfg.contrast > 0:
        c = 1 + (rand(*shape) * 2 - 1) * cfg.contrast
        mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        x = (x - mean) * c + mean
    if cfg.brightness > 0:
        x = x + (rand(*shape) * 2 - 1) * cfg.brightness
    return x
