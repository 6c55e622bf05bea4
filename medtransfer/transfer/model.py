"""A pretrained backbone plus a new task head, and the switches that freeze it."""
from __future__ import annotations

import torch
from torch import nn

_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def build_head(kind: str, in_features: int, num_outputs: int, dropout: float) -> nn.Module:
    """``linear``: Dropout + Linear.  ``mlp``: the classic target model, Linear(128) + ReLU +
    Dropout(0.5) + Linear."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_outputs))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_outputs))
    raise ValueError(f"unknown head '{kind}' (linear, mlp)")


class TransferModel(nn.Module):
    """``backbone`` (pooled features) → ``head`` (logits).

    Binary tasks have one logit (sigmoid); multi-class tasks one logit per class (softmax).
    ``bn_frozen`` keeps every BatchNorm of the backbone in inference mode (running statistics
    used, not updated) even inside ``model.train()``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear", dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = build_head(head, backbone.num_features, 1 if num_classes == 2 else num_classes, dropout)
        self.bn_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)`` (binary: ``[1 - p, p]``)."""
        if self.num_classes == 2:
            p = torch.sigmoid(logits.float().reshape(-1))
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(logits.float(), dim=1)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode and self.bn_frozen:
            for m in self.backbone.modules():
                if isinstance(m, _NORM_TYPES):
                    m.eval()
        return self


def set_backbone_trainable(model: TransferModel, trainable: bool, bn_policy: str = "frozen") -> None:
    """Freeze or unfreeze the backbone.

    Frozen backbone: no gradients and BatchNorm in inference mode. Unfrozen: gradients on, and
    BatchNorm per ``bn_policy`` (``frozen``: statistics and affine parameters stay fixed; ``train``:
    both adapt to the new data).
    """
    bn_fixed = not trainable or bn_policy == "frozen"
    for m in model.backbone.modules():
        is_norm = isinstance(m, _NORM_TYPES)
        for p in m.parameters(recurse=False):
            p.requires_grad_(trainable and not (is_norm and bn_fixed))
    model.bn_frozen = bn_fixed
    model.train(model.training)
