"""The input contract of a weight: what a batch must look like before it reaches the backbone.

:func:`check_input_contract` compares a real batch with it (dims, channels, value range, rough
distribution) and raises :class:`InputContractError` saying what was expected and how to fix it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medtransfer.backbones.registry import WeightSpec, get_weight_spec
from medtransfer.errors import DataError


class InputContractError(DataError, ValueError):
    """A batch does not match the input contract of the backbone's weights."""


@dataclass(frozen=True)
class InputContract:
    """What the network input must be, after preprocessing and normalisation."""

    name: str
    dims: int
    channels: int
    normalization: str = "meanstd"
    """``meanstd``: ``(x - mean) / std`` of a [0, 1] image; ``zscore``: per-volume z-score."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    intensity: str = ""
    max_saturated: float | None = None
    """Largest plausible fraction of values at the top of the range (CT: voxels at or above the top
    of the HU window); more means the volume was not in the units the window assumes."""
    hu_window: tuple[float, float] | None = None
    """CT encoders: the HU window mapped to [0, 1]."""

    @classmethod
    def from_spec(cls, spec: WeightSpec, channels: int | None = None, dims: int | None = None) -> InputContract:
        """The contract of ``spec``'s weights, for a backbone built with ``channels`` / ``dims``."""
        return cls(spec.name, dims or spec.dims, channels or spec.in_channels, spec.normalization,
                   tuple(spec.mean), tuple(spec.std), spec.intensity, 0.5 if spec.ct is not None else None,
                   tuple(spec.ct.hu_window) if spec.ct is not None else None)

    @property
    def expected_range(self) -> tuple[float, float]:
        """Range of a normalised input: the images of [0, 1] through ``(x - mean) / std``."""
        if self.normalization == "zscore":
            return (-5.0, 5.0)
        lo = min((0 - m) / s for m, s in zip(self.mean, self.std))
        hi = max((1 - m) / s for m, s in zip(self.mean, self.std))
        return lo, hi

    def fix_hint(self) -> str:
        if self.hu_window is not None:
            lo, hi = self.hu_window
            return (f"read the CT in HU (medtransfer.io.read_series / read_nifti) and run "
                    f"medtransfer.data.ct.preprocess_ct (HU {lo:g}..{hi:g} -> [0, 1], RAS, the encoder's spacing)")
        if self.normalization == "zscore":
            return "z-score each volume: (x - x[x > 0].mean()) / x[x > 0].std()"
        m = ", ".join(f"{v:g}" for v in self.mean)
        s = ", ".join(f"{v:g}" for v in self.std)
        return f"scale the image to [0, 1] (window CT first), then (x - [{m}]) / [{s}]"


def _as_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch.detach()
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(batch)
    raise InputContractError(f"Expected a torch.Tensor or numpy array batch, got {type(batch).__name__}.")


def _check_windowed_ct(flat: torch.Tensor, lo: float, hi: float, c: InputContract, expected: str) -> None:
    """CT after its HU window: judged on the voxels above the bottom of the window (the bottom is air
    and padding, which says nothing about units). More than ``c.max_saturated`` of them at the top,
    or nearly all of them at one value, means the volume was not in HU."""
    inside = flat[flat > lo + 1e-4]
    if inside.numel() == 0:
        warnings.warn(f"The batch for '{c.name}' is all at the bottom of the window (air or padding only).",
                      stacklevel=3)
        return
    top = float((inside >= hi - 1e-4).float().mean())
    cause = ("so the volume was probably not in the units the window assumes (an MR image, or CT stored values "
             "without RescaleSlope/RescaleIntercept). Fix: read CT through medtransfer.io (HU) before the CT "
             "preprocessing")
    if top > c.max_saturated:  # type: ignore[operator]
        raise InputContractError(
            f"{expected}; {100 * top:.0f}% of the voxels above the bottom of that range sit at its top (at most "
            f"{100 * c.max_saturated:.0f}% is plausible for CT), {cause}."  # type: ignore[operator]
        )
    q_lo, q_hi = (float(v) for v in torch.quantile(inside[:200_000], torch.tensor([0.005, 0.995])))
    if q_hi - q_lo < 0.01 * (hi - lo):
        raise InputContractError(
            f"{expected}; the voxels above the bottom of that range span only [{q_lo:.4g}, {q_hi:.4g}] (under 1% of "
            f"it): the volume's values cover less than 1% of the HU window, {cause}; a volume already scaled to "
            "[0, 1] (or 8-bit display values) must not be windowed again."
        )


def _check_layout(x: torch.Tensor, c: InputContract) -> None:
    """Dimensions, channels and dtype of a batch against the contract."""
    want_nd = c.dims + 2
    layout = "(N, C, H, W)" if c.dims == 2 else "(N, C, D, H, W)"
    if x.ndim != want_nd:
        if x.ndim == 5 and c.dims == 2:
            fix = "use a 3D backbone, load this one with dims=3 (2D->3D inflation), or feed 2D slices"
        elif x.ndim == 4 and c.dims == 3:
            fix = "stack slices into volumes (N, C, D, H, W), or choose a 2D backbone"
        else:
            fix = f"reshape the batch to {layout}"
        raise InputContractError(
            f"'{c.name}' is a {c.dims}D backbone expecting a batch {layout} ({want_nd} dims); got shape "
            f"{tuple(x.shape)} ({x.ndim} dims). Fix: {fix}."
        )
    if x.shape[1] != c.channels:
        raise InputContractError(
            f"'{c.name}' expects {c.channels} input channel(s); the batch has {x.shape[1]} (shape {tuple(x.shape)}). "
            f"Fix: build the backbone for {x.shape[1]} channels (load_backbone(spec, in_channels={x.shape[1]}) adapts "
            f"the first conv), or make the preprocessing produce {c.channels} channel(s)."
        )
    if not x.is_floating_point():
        raise InputContractError(
            f"'{c.name}' expects a float batch; got {x.dtype}. Fix: convert and normalise ({c.fix_hint()})."
        )


def check_input_contract(
    batch: Any,
    spec_or_contract: WeightSpec | InputContract | str,
    *,
    channels: int | None = None,
    dims: int | None = None,
) -> InputContract:
    """Check a batch ``(N, C, H, W)`` or ``(N, C, D, H, W)`` against the weights' input contract.

    ``channels`` / ``dims`` describe the backbone as built (adapted channels, inflated to 3D) when
    they differ from the weights' own. Returns the contract; raises :class:`InputContractError`.
    """
    if isinstance(spec_or_contract, str):
        spec_or_contract = get_weight_spec(spec_or_contract)
    c = (
        InputContract.from_spec(spec_or_contract, channels, dims)
        if isinstance(spec_or_contract, WeightSpec) else spec_or_contract
    )
    x = _as_tensor(batch)
    _check_layout(x, c)
    xf = x.float()
    if not torch.isfinite(xf).all():
        raise InputContractError(f"The batch for '{c.name}' holds NaN or infinite values; check the preprocessing.")
    lo, hi = c.expected_range
    span = hi - lo
    flat = xf.flatten()
    if flat.numel() > 200_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    bmin, bmax = float(flat.min()), float(flat.max())
    q_lo, q_hi = (float(v) for v in torch.quantile(flat, torch.tensor([0.005, 0.995])))
    where = f"values span [{bmin:.4g}, {bmax:.4g}]"
    expected = f"'{c.name}' expects {c.intensity or c.normalization} input, i.e. values about [{lo:.4g}, {hi:.4g}]"
    margin = 0.5 * span
    if bmin < lo - margin or bmax > hi + margin:
        cause = ""
        if bmax > 100 and bmin < -100:
            cause = " This looks like raw Hounsfield units."
        elif bmax > 100:
            cause = " This looks like raw pixel values (e.g. 0..255 or 0..4095)."
        raise InputContractError(f"{expected}; the batch's {where}.{cause} Fix: {c.fix_hint()}.")
    if c.max_saturated is not None:
        _check_windowed_ct(flat, lo, hi, c, expected)
        return c
    if c.normalization == "zscore":
        for i, v in enumerate(xf.flatten(1)):
            m, s = float(v.mean()), float(v.std())
            if abs(m) > 1.5 or not 0.2 < s < 5:
                raise InputContractError(
                    f"'{c.name}' expects each volume z-scored (mean about 0, std about 1); sample {i} has mean "
                    f"{m:.3g} and std {s:.3g}. Fix: {c.fix_hint()}."
                )
        return c
    if q_hi - q_lo == 0:
        warnings.warn(f"The batch for '{c.name}' is constant ({bmin:.4g}); is the image blank?", stacklevel=2)
    elif (q_hi - q_lo) < 0.02 * span:
        raise InputContractError(
            f"{expected}; the batch's {where}, only {100 * (q_hi - q_lo) / span:.2g}% of that range, so it was "
            f"probably not scaled for these weights. Fix: {c.fix_hint()}."
        )
    return c
