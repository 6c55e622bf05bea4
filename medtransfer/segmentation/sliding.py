"""Sliding-window inference of a segmentation model on one preprocessed volume, shared by the
validation during training and by prediction."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medtransfer.io import Volume


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, image: np.ndarray, prep: dict[str, Any]) -> torch.Tensor:
    """Class probabilities ``(K, X, Y, Z)`` for a preprocessed ``(X, Y, Z)`` image (MONAI
    ``sliding_window_inference`` with Gaussian blending; 2D models run slice by slice)."""
    from monai.inferers import sliding_window_inference

    from medtransfer.segmentation.data import slice_stack

    model.eval()
    patch = tuple(prep["patch_size"])
    # windows run where the model is; the volume stays on the CPU
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    kw = dict(roi_size=patch, sw_batch_size=prep.get("sw_batch_size", 32), predictor=model,
              overlap=prep.get("overlap", 0.25), mode="gaussian", sw_device=device, device="cpu")
    if prep["dims"] == 3:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        return torch.softmax(sliding_window_inference(x, **kw), dim=1)[0]
    axis = prep["slice_axis"]
    stack = torch.from_numpy(np.ascontiguousarray(slice_stack(image, axis, prep["context"]), dtype=np.float32))
    probs = torch.softmax(sliding_window_inference(stack, **kw), dim=1)  # (D, K, H, W)
    return torch.movedim(probs, 0, axis + 1)  # (K, X, Y, Z) with D back on its axis


def segment_volume(model: torch.nn.Module, vol: Volume, prep: dict[str, Any]) -> np.ndarray:
    """Label map ``(X, Y, Z)`` of ``vol`` on its own grid (preprocess, infer, resample back)."""
    from medtransfer.segmentation.data import normalize, resample

    image, affine = resample(vol.array, vol.affine, prep.get("spacing"), label=False)
    probs = predict_probabilities(model, normalize(image, prep), prep)
    if probs.shape[1:] != vol.array.shape[:3] or not np.allclose(affine, vol.affine, atol=1e-4):
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        mt = MetaTensor(probs, affine=torch.as_tensor(affine, dtype=torch.float64))
        probs = SpatialResample(mode="bilinear", padding_mode="border")(
            mt, dst_affine=torch.as_tensor(vol.affine, dtype=torch.float64), spatial_size=vol.array.shape[:3])
        probs = torch.as_tensor(probs)
    return probs.argmax(0).numpy().astype(np.int16)
