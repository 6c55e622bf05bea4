"""The files that hold weights in a run directory: ``model.pt`` (the self-describing model) and
``last.pt`` (the resumable training state). Both load with ``torch.load(weights_only=True)``; a file
that is truncated, not a checkpoint at all, or of another format gets a plain message — never the
advice to load it unsafely."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from medtransfer.errors import MedTransferError

MODEL_FORMAT = "medtransfer-run/1"
"""``model.pt`` of a classification run (unchanged since 0.1.0: old run directories still load)."""
SEG_MODEL_FORMAT = "medtransfer-seg/1"
"""``model.pt`` of a segmentation run."""
LAST_FORMAT = "medtransfer-last/2"
"""``last.pt``: the Trainer's state (model, optimizer, scaler, RNG, every callback's state)."""
OLD_LAST_FORMATS = ("medtransfer-last/1",)


class CheckpointError(MedTransferError):
    """A ``model.pt`` / ``last.pt`` that cannot be used (missing, truncated, foreign, other format)."""


def read_checkpoint(path: str | os.PathLike[str], formats: tuple[str, ...], what: str) -> dict[str, Any]:
    """The checkpoint dict at ``path`` whose ``format`` is one of ``formats``.

    ``what`` names the file for messages ("the model of run X"). Raises :class:`CheckpointError`
    saying whether the file is truncated, not a medtransfer checkpoint, or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise CheckpointError(_unreadable(path, what, exc)) from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{what}: {path} is not a medtransfer checkpoint (it holds "
                              f"{type(ckpt).__name__}, without a 'format' entry). Pass the run directory that "
                              "'medtransfer finetune' or 'segment train' wrote.")
    if ckpt["format"] not in formats:
        raise CheckpointError(f"{what}: {path} has format {ckpt['format']!r}; expected "
                              f"{' or '.join(repr(f) for f in formats)}.")
    return ckpt


def _unreadable(path: Path, what: str, exc: BaseException) -> str:
    with open(path, "rb") as fh:
        head = fh.read(4)
    size = path.stat().st_size
    torch_file = head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")  # zip (torch >= 1.6) or pickle
    if torch_file and (isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)):
        return (f"{what}: {path} is not a medtransfer checkpoint: it holds Python objects that a weights-only "
                "load refuses (medtransfer never executes code from a checkpoint). Pass a run directory that "
                "medtransfer wrote.")
    if not torch_file and size:
        return (f"{what}: {path} is not a medtransfer checkpoint (not a PyTorch file at all: it starts with "
                f"{head!r}). Pass a run directory that medtransfer wrote.")
    return (f"{what}: {path} is truncated or corrupt ({size:,} bytes; {type(exc).__name__}). It was probably "
            "cut short by a full disk or a copy that did not finish; copy it again or re-run the job.")


def model_payload(model: torch.nn.Module, config: dict[str, Any], preprocess: dict[str, Any],
                  label_names: list[str], backbone: str, **extra: Any) -> dict[str, Any]:
    """The contents of a classification ``model.pt``: weights + everything needed to rebuild the model
    and reproduce its inputs (config, preprocessing, label names, operating point, versions)."""
    import platform

    from medtransfer._version import __version__

    return {
        "format": MODEL_FORMAT,
        "state_dict": model.state_dict(),
        "config": config,
        "preprocess": preprocess,
        "label_names": list(label_names),
        "num_classes": model.num_classes,
        "backbone": backbone,
        "versions": {"medtransfer": __version__, "torch": str(torch.__version__),
                     "python": platform.python_version()},
        **extra,
    }
