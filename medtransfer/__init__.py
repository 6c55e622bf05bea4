"""medtransfer: transfer learning for medical imaging.

Load a pretrained backbone, adapt it to medical input, fine-tune it on a small labelled set of
DICOM / NIfTI / MedMNIST studies, and report clinical metrics.

Typical notebook use::

    import medtransfer as mt
    cfg = mt.load_config("xray", overrides=["train.finetune_epochs=2"])
    run = mt.finetune(cfg, out_dir="runs/demo")
    print(run.metrics["test"]["auc"])
"""
from __future__ import annotations

from medtransfer._version import __version__  # noqa: E402,F401

from medtransfer.errors import ConfigError, MedTransferError, WeightsUnavailableError  # noqa: E402
from medtransfer.config import RunConfig, load_config  # noqa: E402


def __getattr__(name: str):
    # Heavy entry points (torch, timm) are imported on first use so that `import medtransfer`
    # and `medtransfer --help` stay fast.
    if name in {"finetune", "FinetuneResult"}:
        from medtransfer.train import finetune as _ft

        return getattr(_ft, name)
    if name in {"predict_folder", "load_run"}:
        import medtransfer.inference as _inf

        return getattr(_inf, name)
    raise AttributeError(f"module 'medtransfer' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ConfigError",
    "MedTransferError",
    "WeightsUnavailableError",
    "RunConfig",
    "load_config",
    "finetune",
    "FinetuneResult",
    "predict_folder",
    "load_run",
]
