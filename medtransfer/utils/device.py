"""Which device a job runs on and in which precision (mixed precision on CUDA only)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from medtransfer.options import AMP, look_up_option


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when there is one, else the CPU; otherwise ``name`` (``cuda:1``, ``cpu``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype_for(amp: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``: None (fp32) on CPU or with 'off'; bf16 where the
    GPU supports it under 'auto' (no loss scaling needed), else fp16 (trained with a GradScaler)."""
    amp = look_up_option(amp, AMP, "train.amp")
    if device.type != "cuda" or amp is AMP.OFF:
        return None
    if amp is AMP.AUTO:
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float16
    return torch.bfloat16 if amp is AMP.BF16 else torch.float16


def autocast_for(device: torch.device, dtype: torch.dtype | None) -> Callable[[], Any]:
    """A factory of autocast contexts (a no-op one in fp32)."""
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


_PRECISION = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}


def compute_info(device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, world: int) -> dict[str, Any]:
    """What a run computed on, for metrics.json: device, precision, memory format, pinned memory, ranks."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {"device": name, "precision": _PRECISION[amp_dtype], "channels_last": channels_last,
            "pinned_memory": device.type == "cuda", "world_size": world, "torch": torch.__version__}
