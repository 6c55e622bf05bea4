"""A trained classification model rebuilt from its run directory, ready to predict."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtransfer.backbones import get_weight_spec
from medtransfer.config import RunConfig, config_from_dict
from medtransfer.data.preprocess import Preprocessor, PreprocessSpec
from medtransfer.errors import MedTransferError
from medtransfer.options import VolumeEncoder
from medtransfer.run.checkpoint import MODEL_FORMAT, SEG_MODEL_FORMAT, read_checkpoint
from medtransfer.transfer import EnsembleModel, TransferModel
from medtransfer.transfer.tasks import task_spec
from medtransfer.transfer.volume import build_backbone
from medtransfer.utils.device import pick_device


@dataclass
class LoadedRun:
    """A trained model rebuilt from its run directory, ready to predict."""

    model: TransferModel | EnsembleModel
    pre: Preprocessor
    label_names: list[str]
    config: RunConfig
    device: torch.device
    checkpoint: dict[str, Any] = field(repr=False, default_factory=dict)
    run_dir: str = ""

    @property
    def operating_point(self) -> dict[str, Any] | None:
        return self.checkpoint.get("operating_point")

    @property
    def threshold(self) -> float | None:
        """The binary operating point chosen on validation during training (None: argmax)."""
        t = (self.operating_point or {}).get("threshold")
        return float(t) if isinstance(t, (int, float)) and len(self.label_names) == 2 else None

    def decide(self, prob: np.ndarray) -> Any:
        """The decision for one probability row by the task's rule (see :mod:`medtransfer.transfer.tasks`):
        the validation operating point for binary models, the median grade for ordinal ones, else the
        most probable class."""
        return task_spec(self.model.task).decide(prob, self.operating_point)

    def predicted_label(self, prob: np.ndarray) -> str:
        """The predicted class name; for multi-label models the names at or above their per-label
        thresholds chosen on validation, joined by ';'."""
        return task_spec(self.model.task).label_text(prob, self.label_names, self.operating_point)


def is_segmentation_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir/model.pt`` is a segmentation model (read lazily, without building it)."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        return False
    ckpt = read_checkpoint(path, (MODEL_FORMAT, SEG_MODEL_FORMAT), f"the model of run '{run_dir}'")
    return ckpt["format"] == SEG_MODEL_FORMAT


def _member(ckpt: dict[str, Any], cfg: RunConfig, spec: PreprocessSpec) -> TransferModel:
    if cfg.model.volume_encoder == VolumeEncoder.AUTO:  # written before volume encoders: slices were channels
        cfg.model.volume_encoder = VolumeEncoder.CHANNELS.value
    backbone, _ = build_backbone(get_weight_spec(ckpt["backbone"]), cfg.model, spec.channels, "none")
    return TransferModel(backbone, int(ckpt["num_classes"]), cfg.model.head, cfg.model.dropout, cfg.model.task,
                         cfg.model.slice_pooling)


def load_run(run_dir: str | os.PathLike[str], device: str = "auto") -> LoadedRun:
    """Rebuild the model of a run directory from its self-describing ``model.pt`` (no network)."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise MedTransferError(
            f"'{run_dir}' is not a medtransfer run directory (no model.pt). "
            "Pass the --out folder of a finished 'medtransfer finetune'."
        )
    ckpt = read_checkpoint(path, (MODEL_FORMAT,), f"the model of run '{run_dir}'")
    cfg = config_from_dict(ckpt["config"])
    spec = PreprocessSpec.from_dict(ckpt["preprocess"])
    # An ensemble's weights name its members ("members.<i>."): as many as were trained, which a time
    # limit may have cut below train.ensemble.
    n_members = len({k.split(".")[1] for k in ckpt["state_dict"] if k.startswith("members.")})
    model = (EnsembleModel([_member(ckpt, cfg, spec) for _ in range(n_members)]) if n_members
             else _member(ckpt, cfg, spec))
    model.load_state_dict(ckpt["state_dict"])
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedRun(model, Preprocessor(spec), list(ckpt["label_names"]), cfg, dev, ckpt, str(run_dir))
