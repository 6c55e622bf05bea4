"""The run directory and its checkpoints: the one owner of ``config.yaml``, ``metrics.json``,
``model.pt`` and ``last.pt``, and the loader that rebuilds a trained model from them."""
from medtransfer.run.checkpoint import (
    LAST_FORMAT,
    MODEL_FORMAT,
    SEG_MODEL_FORMAT,
    CheckpointError,
    read_checkpoint,
)
from medtransfer.run.directory import RunDirectory, default_run_dir
from medtransfer.run.loaded import LoadedRun, is_segmentation_run, load_run

__all__ = ["LAST_FORMAT", "MODEL_FORMAT", "SEG_MODEL_FORMAT", "CheckpointError", "LoadedRun", "RunDirectory",
           "default_run_dir", "is_segmentation_run", "load_run", "read_checkpoint"]
