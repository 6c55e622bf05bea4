"""Typed segmentation config: ``data`` / ``model`` / ``train`` sections, modality presets, overrides.

Presets live in ``medtransfer/configs/segmentation/<modality>.yaml`` (separate from the
classification presets). Keys are validated with did-you-mean errors (:class:`ConfigError`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from medtransfer.config import _build, _deep_merge, parse_override, read_user_yaml
from medtransfer.errors import ConfigError
from medtransfer.options import AMP, BNPolicy

MODALITIES = ("mri", "ct")
NORMALIZE = ("zscore", "window", "none")
BN_POLICIES = tuple(p for p in BNPolicy.values() if p != BNPolicy.AUTO)


def _choices(*options: str) -> dict[str, Any]:
    return {"choices": options}


@dataclass
class SegDataConfig:
    path: str = ""
    """A Decathlon folder (``dataset.json`` optional, ``imagesTr``/``labelsTr``), an ``images``/``labels``
    folder pair, or a folder of DICOM series with DICOM SEG files."""
    spacing: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    """Target voxel size in mm (images linearly, masks by nearest neighbour); [] keeps the native grid."""
    normalize: str = field(default="zscore", metadata=_choices(*NORMALIZE))
    zscore_nonzero: bool = True
    window: list[float] = field(default_factory=lambda: [-175.0, 250.0])
    """CT: HU range clipped and scaled to [0, 1]."""
    label_names: list[str] = field(default_factory=list)
    """Names by label value (entry 0 = background); empty: from dataset.json or ``label_<k>``."""
    val_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 0.9})
    test_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})
    train_fraction: float = field(default=1.0, metadata={"min": 0.01, "max": 1.0})
    """Use only this share of the training cases (seeded), e.g. for low-data experiments."""
    seed: int = 0
    max_cases: int = field(default=0, metadata={"min": 0})
    """Read at most this many cases (0 = all), for smoke runs."""


@dataclass
class SegModelConfig:
    encoder: str = "efficientnet_lite0.in1k"
    weights: str = "pretrained"
    """``pretrained``, ``none`` (random initialisation) or a checkpoint file for the encoder."""
    dims: int = field(default=2, metadata={"min": 2, "max": 3})
    """2: slice-wise (2.5D with ``context``); 3: volumetric (a 2D encoder is inflated)."""
    context: int = field(default=1, metadata={"min": 0, "max": 5})
    """2D only: neighbouring slices on each side stacked as channels (1 → 3 channels)."""
    slice_axis: int = field(default=2, metadata={"min": 0, "max": 2})
    inflate: str = field(default="average", metadata=_choices("average", "centre"))
    stages: int = field(default=0, metadata={"min": 0})
    """Keep the encoder's first k stages (0 = all); fewer stages is faster on small images."""
    decoder_channels: list[int] = field(default_factory=lambda: [128, 64, 32, 16, 16])
    """Channels of each decoder block, deepest first; trimmed/extended to the encoder's number of stages."""


@dataclass
class SegTrainConfig:
    patch_size: list[int] = field(default_factory=lambda: [64, 64])
    batch_size: int = field(default=16, metadata={"min": 1})
    epochs: int = field(default=20, metadata={"min": 1})
    steps_per_epoch: int = field(default=100, metadata={"min": 1})
    lr: float = field(default=2e-3, metadata={"min": 0.0})
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    encoder_lr_ratio: float = field(default=0.1, metadata={"min": 0.0})
    """Encoder learning rate = ``lr × encoder_lr_ratio`` once it is unfrozen."""
    freeze_encoder_epochs: int = field(default=2, metadata={"min": 0})
    """Train only the decoder for the first N epochs (skipped for a randomly initialised encoder)."""
    bn_policy: str = field(default="train", metadata=_choices(*BN_POLICIES))
    pos_fraction: float = field(default=0.67, metadata={"min": 0.0, "max": 1.0})
    """Share of patches centred on foreground (RandCropByPosNegLabeld)."""
    val_every: int = field(default=5, metadata={"min": 1})
    select_best: bool = False
    """Keep the weights of the best validation epoch (else the last epoch)."""
    overlap: float = field(default=0.25, metadata={"min": 0.0, "max": 0.9})
    sw_batch_size: int = field(default=32, metadata={"min": 1})
    overlay_plots: int = field(default=4, metadata={"min": 0})
    """Cases drawn in the report's overlay figure (0 = no figure)."""
    num_threads: int = field(default=0, metadata={"min": 0})
    """torch threads (0 = leave torch's default)."""
    patience: int = field(default=0, metadata={"min": 0})
    """Early stopping after this many validations without a better mean Dice (0: off)."""
    time_limit_minutes: float = field(default=0.0, metadata={"min": 0.0})
    """Wall-clock limit for the run (0: none): no epoch starts that would not finish, with the final
    evaluation, in time; metrics.json records what was cut."""
    amp: str = field(default="auto", metadata={"choices": AMP.values()})
    """Mixed precision on CUDA only ('auto': bf16 where supported, else fp16 with a GradScaler)."""
    device: str = "auto"
    seed: int = 0


@dataclass
class SegConfig:
    modality: str = field(default="mri", metadata=_choices(*MODALITIES))
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    train: SegTrainConfig = field(default_factory=SegTrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def preset_dict(modality: str) -> dict[str, Any]:
    """The raw preset of ``modality`` (``mri`` or ``ct``)."""
    if modality not in MODALITIES:
        from medtransfer._suggest import did_you_mean

        raise ConfigError(f"Unknown segmentation modality '{modality}'.{did_you_mean(modality, MODALITIES)} "
                          f"Valid: {', '.join(MODALITIES)}.")
    text = resources.files("medtransfer.configs.segmentation").joinpath(f"{modality}.yaml").read_text()
    return yaml.safe_load(text) or {}


def seg_config_from_dict(values: dict[str, Any]) -> SegConfig:
    """Validate a plain dict (a preset merged with overrides, or a saved ``config.yaml``)."""
    cfg = _build(SegConfig, values, "")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 0.95:
        raise ConfigError("data.val_fraction + data.test_fraction must leave at least 5% of cases for training.")
    want = cfg.model.dims
    if len(cfg.train.patch_size) != want:
        raise ConfigError(f"train.patch_size has {len(cfg.train.patch_size)} entries but model.dims is {want}; "
                          f"give {want} sizes, e.g. --set train.patch_size=[{', '.join(['64'] * want)}].")
    if cfg.data.spacing and len(cfg.data.spacing) != 3:
        raise ConfigError("data.spacing must have 3 values in mm (or [] to keep the native grid).")
    if cfg.data.normalize == "window" and len(cfg.data.window) != 2:
        raise ConfigError("data.window must be [low, high] in HU, e.g. [-175, 250].")
    return cfg


def load_seg_config(
    modality: str = "mri",
    config_file: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    **sections: dict[str, Any],
) -> SegConfig:
    """Preset of ``modality`` ← ``config_file`` (YAML) ← ``sections`` (e.g. ``data={"path": ...}``)
    ← dotted ``overrides`` (``["train.epochs=5"]``)."""
    values = preset_dict(modality)
    values["modality"] = modality
    if config_file is not None:
        values = _deep_merge(values, read_user_yaml(config_file))
    for name, section in sections.items():
        if section:
            values = _deep_merge(values, {name: section})
    for text in overrides or []:
        values = _deep_merge(values, parse_override(text))
    return seg_config_from_dict(values)
