"""Backbones: registry of architectures and weights, safe loading, adaptation, load reports."""
from medtransfer.backbones.load import (
    CheckpointError,
    LoadReport,
    adapt_input_conv,
    load_backbone,
    read_state_dict,
    sha256_file,
)
from medtransfer.backbones.registry import (
    PipSource,
    WeightSpec,
    count_parameters,
    get_weight_spec,
    list_weights,
    register,
)

__all__ = [
    "CheckpointError",
    "LoadReport",
    "PipSource",
    "WeightSpec",
    "adapt_input_conv",
    "count_parameters",
    "get_weight_spec",
    "list_weights",
    "load_backbone",
    "read_state_dict",
    "register",
    "sha256_file",
]
