"""Segmentation transfer: U-Net decoders on registered encoders (2D/2.5D/3D), Decathlon / folder /
DICOM SEG data, Dice+CE training on the package's Trainer with sliding-window validation, prediction
to NIfTI and DICOM SEG.

The names below are imported on first use, so that reading data or predicting does not import the
training code (and the reverse)."""
from __future__ import annotations

from medtransfer.utils.lazy import lazy_exports

_WHERE = {
    "SegConfig": "config", "load_seg_config": "config", "seg_config_from_dict": "config",
    "SegCase": "data", "discover_cases": "data", "split_cases": "data",
    "SegmentationNet": "model", "build_segmentation_model": "model", "encoder_features": "model",
    "segment_volume": "sliding", "predict_probabilities": "sliding",
    "load_run": "inference", "predict_segmentation": "inference",
    "train_segmentation": "train",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)