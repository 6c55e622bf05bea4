"""Saliency maps of classification models: Grad-CAM, Grad-CAM++ and occlusion sensitivity, 2D and 3D.

Grad-CAM and Grad-CAM++ are MONAI's (:mod:`monai.visualize`); their target layer is the
backbone's ``cam_layer`` from the weights registry (the last spatial feature map before pooling),
never guessed. Occlusion sensitivity (MONAI's ``OcclusionSensitivity``) needs no layer and works for
any model, at the cost of one forward pass per mask position.

A map has the input's spatial shape, is scaled to ``[0, 1]`` per image, and says where evidence *for*
the explained class lies (Grad-CAM: positive part of the weighted activations; occlusion: drop in that
class's probability when the region is hidden).

The model is copied once per :class:`SaliencyExplainer` (MONAI registers hooks it never removes, and
turns in-place activations off), so the caller's model is left untouched.
"""
from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medtransfer.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "SaliencyExplainer", "cam_layer_names", "peak_index", "peak_in_disk", "rank_correlation"]

METHODS = ("gradcam", "gradcampp", "occlusion")


class _ClassScores(nn.Module):
    """Per-class scores of a medtransfer model, so that MONAI's ``class_idx`` indexes classes.

    ``binary``: ``[-z, z]`` (the positive class's score is its logit); ``multiclass`` / ``multilabel``:
    the logits; ``ordinal`` and others: log class probabilities.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x).float()
        task = self.model.task
        if task == "binary":
            z = logits.reshape(-1, 1)
            return torch.cat([-z, z], dim=1)
        if task in ("multiclass", "multilabel"):
            return logits
        return torch.log(self.model.probabilities(logits).clamp_min(1e-7))


def cam_layer_names(model: nn.Module, backbone: str, layer: str | None = None) -> list[str]:
    """Names (in ``model.named_modules()``) of the Grad-CAM target layer, one per ensemble member.

    The layer is ``layer`` (a module name inside the backbone) or else the registry's ``cam_layer`` of
    ``backbone``; a truncated backbone that lost it raises :class:`ConfigError` suggesting occlusion,
    which needs no layer.
    """
    from medtransfer.backbones import get_weight_spec

    spec = get_weight_spec(backbone)
    layer = layer or spec.cam_layer
    if not layer:
        raise ConfigError(f"Backbone '{spec.name}' names no Grad-CAM layer (cam_layer) in the registry; "
                          "use the occlusion method instead.")
    prefixes = [f"members.{i}." for i in range(len(model.members))] if hasattr(model, "members") else [""]
    names = [f"{p}backbone.{layer}" for p in prefixes]
    present = {n for n, _ in model.named_modules()}
    if any(n not in present for n in names):
        raise ConfigError(f"The Grad-CAM layer '{layer}' of '{spec.name}' is not in this model (a truncated "
                          "backbone?); use the occlusion method instead.")
    return names


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``(N, ...)`` to ``[0, 1]`` (a constant map becomes zeros)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)


class SaliencyExplainer:
    """Explains one model's predictions with one method; reuse it across batches.

    ``backbone`` is the registry name of the model's backbone (``run.checkpoint["backbone"]``); it is
    needed for the Grad-CAM methods only. Occlusion hides cubes/squares of ``mask_size`` (default an
    eighth of the input side, at least 4) with the image mean, moving by ``mask_size × (1 - overlap)``,
    and scores the drop of the class score (logit, or log-probability), which does not saturate as a
    probability near 1 does. ``layer`` overrides the registry's Grad-CAM layer (a module name inside
    the backbone).
    """

    def __init__(self, model: nn.Module, method: str = "gradcam", backbone: str | None = None, *,
                 layer: str | None = None, mask_size: int | None = None, overlap: float = 0.5, n_batch: int = 32):
        if method not in METHODS:
            raise ConfigError(f"Unknown saliency method '{method}'; choose one of {', '.join(METHODS)}.")
        self.method, self.mask_size, self.overlap, self.n_batch = method, mask_size, overlap, n_batch
        self._model = copy.deepcopy(model).float().eval()
        self.task = self._model.task
        if method == "occlusion":
            self._cams: list[Any] = []
        else:
            from monai.visualize import GradCAM, GradCAMpp

            if backbone is None:
                raise ConfigError("Grad-CAM needs the backbone's registry name to find its target layer.")
            cls = GradCAM if method == "gradcam" else GradCAMpp
            scores = _ClassScores(self._model)
            self._cams = [cls(scores, target_layers=f"model.{name}", postprocessing=lambda m: m)
                          for name in cam_layer_names(self._model, backbone, layer)]

    def explain(self, x: torch.Tensor, class_index: int | Sequence[int]) -> torch.Tensor:
        """Maps ``(N, *spatial)`` in ``[0, 1]`` for a normalised batch ``x`` ``(N, C, *spatial)``, explaining
        ``class_index`` (one class for all, or one per image)."""
        device = next(self._model.parameters()).device
        x = x.detach().float().to(device)
        idx = [int(class_index)] * x.shape[0] if isinstance(class_index, (int, np.integer)) else [int(c) for c in class_index]
        if len(idx) != x.shape[0]:
            raise ValueError(f"{len(idx)} class indices for a batch of {x.shape[0]}")
        if self.method == "occlusion":
            maps = torch.cat([self._occlusion(x[i:i + 1], c) for i, c in enumerate(idx)])
        else:
            maps = torch.cat([self._cam(x[i:i + 1], c) for i, c in enumerate(idx)])
        return _normalise(maps.detach().cpu())

    def _cam(self, x: torch.Tensor, class_index: int) -> torch.Tensor:
        """Grad-CAM(++) of one image, averaged over ensemble members (raw maps, before scaling)."""
        with torch.enable_grad():
            maps = [cam(x.clone().requires_grad_(True), class_idx=class_index)[:, 0] for cam in self._cams]
        return torch.stack(maps).mean(0)

    def _occlusion(self, x: torch.Tensor, class_index: int) -> torch.Tensor:
        """Drop of the class score when each region is hidden by the image mean (one image)."""
        from monai.visualize import OcclusionSensitivity

        side = min(x.shape[2:])
        mask = self.mask_size or max(4, side // 8)
        scores = _ClassScores(self._model)
        occ = OcclusionSensitivity(scores, mask_size=mask, n_batch=self.n_batch, verbose=False, mode="mean_img",
                                   overlap=self.overlap, activate=False)
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI indexes tensors with lists inside sliding_window_inference (a torch UserWarning per call)
            warnings.filterwarnings("ignore", message=".*non-tuple sequence.*", category=UserWarning)
            base = scores(x)[0, class_index]
            occ_map, _ = occ(x)  # (1, n_classes, *spatial): the class scores with the region hidden
        return (base - occ_map[:, class_index]).clamp_min(0)


def peak_index(saliency: Any) -> tuple[int, ...]:
    """Index of the map's maximum (``(row, col)`` in 2D, ``(i, j, k)`` in 3D)."""
    a = np.asarray(saliency)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(a)), a.shape))


def peak_in_disk(saliency: Any, centre: Sequence[float], radius: float) -> bool:
    """Whether the map's peak lies within ``radius`` (pixels) of ``centre`` (pixel coordinates in the map's
    index order, e.g. ``(row, col)``)."""
    peak = np.asarray(peak_index(saliency), dtype=np.float64)
    return bool(np.linalg.norm(peak - np.asarray(centre, dtype=np.float64)) <= radius)


def rank_correlation(a: Any, b: Any) -> float:
    """Spearman rank correlation between two maps (flattened); NaN when either is constant."""
    from scipy.stats import spearmanr

    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)
