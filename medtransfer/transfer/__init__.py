"""Transfer plan: new heads, freezing and the BatchNorm policy."""
from medtransfer.transfer.model import TransferModel, build_head, set_backbone_trainable

__all__ = ["TransferModel", "build_head", "set_backbone_trainable"]
