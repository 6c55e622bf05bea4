"""Segmentation transfer: U-Net decoders on registered encoders (2D/2.5D/3D), Decathlon / folder /
DICOM SEG data, Dice+CE training with sliding-window validation, prediction to NIfTI and DICOM SEG."""
from medtransfer.segmentation.config import SegConfig, load_seg_config, seg_config_from_dict
from medtransfer.segmentation.data import SegCase, discover_cases, split_cases
from medtransfer.segmentation.inference import CHECKPOINT_FORMAT, load_run, predict_segmentation, segment_volume
from medtransfer.segmentation.model import SegmentationNet, build_segmentation_model, encoder_features
from medtransfer.segmentation.train import train_segmentation

__all__ = [
    "CHECKPOINT_FORMAT",
    "SegCase",
    "SegConfig",
    "SegmentationNet",
    "build_segmentation_model",
    "discover_cases",
    "encoder_features",
    "load_run",
    "load_seg_config",
    "predict_segmentation",
    "seg_config_from_dict",
    "segment_volume",
    "split_cases",
    "train_segmentation",
]
