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

__all__ = ["METHODS", "SaliencyExplainer", "cam_layer_names", "gallery_image", "peak_index", "peak_in_disk",
           "randomised_copy", "rank_correlation", "saliency_overlay"]

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
    ``backbone``. A backbone truncated above the registry's layer (its stage replaced by an identity,
    never run) falls back to its deepest kept stage where it names its stages; otherwise a lost layer
    raises :class:`ConfigError` suggesting occlusion, which needs no layer.
    """
    from medtransfer.backbones import get_weight_spec

    spec = get_weight_spec(backbone)
    prefixes = [f"members.{i}." for i in range(len(model.members))] if hasattr(model, "members") else [""]
    modules = dict(model.named_modules())
    layer = layer or _registry_layer_kept(spec, modules.get(f"{prefixes[0]}backbone"))
    if not layer:
        raise ConfigError(f"Backbone '{spec.name}' names no Grad-CAM layer (cam_layer) in the registry; "
                          "use the occlusion method instead.")
    names = [f"{p}backbone.{layer}" for p in prefixes]
    if any(not _runs(modules.get(n)) for n in names):
        raise ConfigError(f"The Grad-CAM layer '{layer}' of '{spec.name}' is not in this model (a truncated "
                          "backbone?); use the occlusion method instead.")
    return names


def _runs(module: nn.Module | None) -> bool:
    """A module the forward pass computes: present and not a truncation's identity placeholder (a bare
    ``nn.Identity``; named identity taps such as the ViT's ``TokenMap`` do run)."""
    return module is not None and type(module) is not nn.Identity


def _registry_layer_kept(spec: Any, backbone: nn.Module | None) -> str | None:
    """The registry's ``cam_layer`` if ``backbone`` still runs it, else its deepest kept stage (named by
    ``stage_names``, the uniform encoder interface), else the registry's name (reported as lost)."""
    if backbone is None or _runs(_submodule(backbone, spec.cam_layer)):
        return spec.cam_layer
    deepest = getattr(backbone, "stage_names", (None,))[-1]
    return deepest if _runs(_submodule(backbone, deepest)) else spec.cam_layer


def _submodule(module: nn.Module, name: str | None) -> nn.Module | None:
    try:
        return module.get_submodule(name) if name else None
    except AttributeError:
        return None


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``(N, ...)`` to ``[0, 1]`` (a constant map becomes zeros)."""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)


class SaliencyExplainer:
    """Explains one model's predictions with one method; reuse it across batches.

    ``backbone`` is the registry name of the model's backbone (``run.checkpoint["backbone"]``); it is
    needed for the Grad-CAM methods only. Occlusion hides squares / cubes of ``mask_size`` (default an
    eighth of the side in 2D, a quarter in 3D, at least 4) with the image mean, moving by ``mask_size × (1 - overlap)``,
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
        """Grad-CAM(++) of one image (raw, before scaling); for an ensemble the mean of the maps at each
        member's layer, all of the ensemble's own score."""
        with torch.enable_grad():
            maps = [cam(x.clone().requires_grad_(True), class_idx=class_index)[:, 0] for cam in self._cams]
        return torch.stack(maps).mean(0)

    def _occlusion(self, x: torch.Tensor, class_index: int) -> torch.Tensor:
        """Drop of the class score when each region is hidden by the image mean (one image)."""
        from monai.visualize import OcclusionSensitivity

        side = min(x.shape[2:])
        mask = self.mask_size or max(4, side // (8 if x.ndim == 4 else 4))  # 3D: (side / stride)^3 passes
        scores = _ClassScores(self._model)
        occ = OcclusionSensitivity(scores, mask_size=mask, n_batch=self.n_batch, verbose=False, mode="mean_img",
                                   overlap=self.overlap, activate=False)
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI indexes tensors with lists inside sliding_window_inference (a torch UserWarning per call)
            warnings.filterwarnings("ignore", message=".*non-tuple sequence.*", category=UserWarning)
            base = scores(x)[0, class_index]
            occ_map, _ = occ(x)  # (1, n_classes, *spatial): the class scores with the region hidden
        return (base - occ_map[:, class_index]).clamp_min(0)


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every weight re-initialised and normalisation statistics reset (in eval
    mode): the reference of the model-randomisation test (Adebayo et al., 2018), whose maps should
    differ from the trained model's if the maps depend on what the model learnt."""
    rand = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in rand.modules():
        for reset in ("reset_parameters", "reset_running_stats"):
            if hasattr(m, reset):
                getattr(m, reset)()
    return rand.eval()


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


# ------------------------------------------------------------------------------------------ overlays
_MIN_SIDE = 256
"""Overlays are drawn at least this many pixels wide per view (model inputs are often 64–128 px)."""


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` in ``[0, 1]`` → ``(H, W, 3)`` uint8 (gray from the first channel unless it is RGB)."""
    a = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    rgb = a[:3].transpose(1, 2, 0) if a.shape[0] == 3 else np.repeat(a[0][..., None], 3, axis=2)
    return (rgb * 255).astype(np.uint8)


def _blend(image: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> Any:
    """The image with the map in the 'jet' colours on top, weighted by the map (low values stay clear)."""
    from matplotlib import colormaps
    from PIL import Image

    heat = (colormaps["jet"](np.clip(saliency, 0, 1))[..., :3] * 255).astype(np.float32)
    w = (alpha * np.clip(saliency, 0, 1))[..., None]
    out = (1 - w) * _to_rgb(image).astype(np.float32) + w * heat
    img = Image.fromarray(out.astype(np.uint8))
    scale = max(1, int(np.ceil(_MIN_SIDE / max(img.size))))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.BILINEAR)


def _views(image: np.ndarray, saliency: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """2D: the image itself; 3D ``(C, X, Y, Z)``: the three orthogonal slices through the map's peak."""
    if saliency.ndim == 2:
        return [(image, saliency)]
    i, j, k = peak_index(saliency)
    # shown with superior / anterior up: slices of RAS-ordered arrays, transposed and flipped for display
    return [(np.flip(image[:, :, :, k].transpose(0, 2, 1), 1), np.flip(saliency[:, :, k].T, 0)),
            (np.flip(image[:, :, j, :].transpose(0, 2, 1), 1), np.flip(saliency[:, j, :].T, 0)),
            (np.flip(image[:, i, :, :].transpose(0, 2, 1), 1), np.flip(saliency[i, :, :].T, 0))]


def saliency_overlay(image: Any, saliency: Any, text: Sequence[str] = ()) -> Any:
    """A ``PIL.Image`` of ``image`` (``(C, *spatial)`` in ``[0, 1]``, as the model saw it) with ``saliency``
    on top and ``text`` lines in the top-left corner; 3D inputs show axial, coronal and sagittal slices
    through the map's peak side by side."""
    from PIL import Image, ImageDraw

    img, sal = np.asarray(image, dtype=np.float32), np.asarray(saliency, dtype=np.float32)
    tiles = [_blend(v, s) for v, s in _views(img, sal)]
    canvas = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width
    if text:
        draw = ImageDraw.Draw(canvas)
        box = draw.multiline_textbbox((6, 6), "\n".join(text))
        draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(0, 0, 0))
        draw.multiline_text((6, 6), "\n".join(text), fill=(255, 255, 255))
    return canvas


def gallery_image(groups: Sequence[tuple[str, Sequence[Any]]]) -> Any:
    """Rows of overlay images (``(row title, [PIL images])``), each row titled on its left."""
    from PIL import Image, ImageDraw

    rows = [(title, list(tiles)) for title, tiles in groups if tiles]
    if not rows:
        raise ValueError("gallery_image needs at least one image")
    label_w, pad = 150, 6
    width = label_w + max(sum(t.width + pad for t in tiles) for _, tiles in rows)
    heights = [max(t.height for t in tiles) + pad for _, tiles in rows]
    canvas = Image.new("RGB", (width, sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (title, tiles), h in zip(rows, heights):
        draw.multiline_text((6, y + h // 2 - 12), title, fill=(0, 0, 0))
        x = label_w
        for t in tiles:
            canvas.paste(t, (x, y))
            x += t.width + pad
        y += h
    return canvas
