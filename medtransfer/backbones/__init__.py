"""Backbones: registry of architectures and weights, weight sources and cache, safe loading,
adaptation (channels, 2D→3D, truncation), load reports and input contracts."""
from medtransfer.backbones.adapt import (
    adapt_input_conv,
    convert_to_3d,
    inflate_conv_weight,
    map_input_channels,
    truncate,
)
from medtransfer.backbones.checkpoint import CheckpointError, read_state_dict, sha256_file
from medtransfer.backbones.contract import InputContract, InputContractError, check_input_contract
from medtransfer.backbones.load import LoadReport, load_backbone, locate_weights
from medtransfer.backbones.registry import (
    Stage,
    WeightSpec,
    count_parameters,
    get_weight_spec,
    list_weights,
    register,
)
from medtransfer.backbones.sources import (
    CacheSource,
    FileSource,
    HubSource,
    ManualSource,
    PipSource,
    Shard,
    ShardedPipSource,
    ShardError,
    UrlSource,
    is_offline,
    weights_dir,
)
from medtransfer.backbones.store import export_weights, import_weights, pull_weights, verify_weights
from medtransfer.backbones import catalog  # noqa: E402,F401,I001  (registers the built-in weights; after registry)

__all__ = [
    "CacheSource",
    "CheckpointError",
    "FileSource",
    "HubSource",
    "InputContract",
    "InputContractError",
    "LoadReport",
    "ManualSource",
    "PipSource",
    "Shard",
    "ShardError",
    "ShardedPipSource",
    "Stage",
    "UrlSource",
    "WeightSpec",
    "adapt_input_conv",
    "check_input_contract",
    "convert_to_3d",
    "count_parameters",
    "export_weights",
    "get_weight_spec",
    "import_weights",
    "inflate_conv_weight",
    "is_offline",
    "list_weights",
    "load_backbone",
    "locate_weights",
    "map_input_channels",
    "pull_weights",
    "read_state_dict",
    "register",
    "sha256_file",
    "truncate",
    "verify_weights",
    "weights_dir",
]
