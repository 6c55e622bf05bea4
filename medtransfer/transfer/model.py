"""A pretrained backbone plus a new task head; an ensemble of such models.

What each task means (outputs, loss, probabilities, decision rule) lives in
:mod:`medtransfer.transfer.tasks`; the models here only ask it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medtransfer.options import Head, Task, look_up_option
from medtransfer.transfer.tasks import resolve_task, task_spec
from medtransfer.transfer.volume import head_input

TASKS = Task.values()
HEADS = Head.values()


def num_outputs(task: str, num_classes: int) -> int:
    """Logits the head produces for ``task`` with ``num_classes`` classes (labels for multilabel)."""
    return task_spec(task).outputs(num_classes)


def build_head(kind: str, in_features: int, num_outputs: int, dropout: float) -> nn.Module:
    """``linear``: Dropout + Linear.  ``mlp``: the classic target model, Linear(128) + ReLU +
    Dropout(0.5) + Linear."""
    kind = look_up_option(kind, Head, "model.head")
    if kind is Head.LINEAR:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_outputs))
    return nn.Sequential(nn.Linear(in_features, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_outputs))


class TransferModel(nn.Module):
    """``backbone`` (pooled features) → ``head`` (logits) for one task. A slice encoder's per-slice
    features are pooled first (``pooling``, part of the head: it trains in the head-only epochs).

    BatchNorm modules that :func:`medtransfer.transfer.apply_plan` marked as fixed stay in
    inference mode (running statistics used, not updated) across ``model.train()``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear", dropout: float = 0.2,
                 task: str = "auto", pooling: str = "attention"):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.task = resolve_task(task, num_classes)
        head_module = build_head(head, backbone.num_features, num_outputs(self.task, num_classes), dropout)
        # A slice encoder gives one feature vector per slice: ``pooling`` over them trains with the head.
        self.head = head_input(backbone, head_module, pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, num_classes)`` class probabilities (binary: ``[1 - p, p]``; multilabel: one sigmoid
        per label)."""
        return task_probabilities(self.task, logits)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode:
            from medtransfer.transfer.plan import restore_frozen_norms

            restore_frozen_norms(self)
        return self


class EnsembleModel(nn.Module):
    """Members of one task trained on the same split; their probabilities are averaged.

    ``forward`` returns logits whose :func:`task_probabilities` are the members' mean probabilities
    (the logit of the mean for sigmoid tasks, the log of the mean for softmax), so every consumer of
    a :class:`TransferModel` (evaluation, operating points, batch prediction) works unchanged.
    """

    def __init__(self, members: list[TransferModel]):
        super().__init__()
        if not members or len({(m.task, m.num_classes) for m in members}) != 1:
            raise ValueError("ensemble members must exist and share one task and class count")
        self.members = nn.ModuleList(members)
        self.task, self.num_classes = look_up_option(members[0].task, Task, "task"), members[0].num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x).float() for m in self.members]
        eps = 1e-7
        if self.task is Task.MULTICLASS:
            return torch.stack([torch.softmax(o, dim=1) for o in outs]).mean(0).clamp_min(eps).log()
        p = torch.stack([torch.sigmoid(o) for o in outs]).mean(0).clamp(eps, 1 - eps)
        return torch.log(p) - torch.log1p(-p)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return task_probabilities(self.task, logits)


def task_probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    return task_spec(task).probabilities(logits)


class TaskLoss(nn.Module):
    """The loss of a task (see :mod:`medtransfer.transfer.tasks`), with optional per-class weights
    (see :func:`class_weights`)."""

    def __init__(self, task: str, num_classes: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.num_classes = task_spec(task), num_classes
        self.task = self.spec.task
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.spec.loss(logits, y, self.weight, self.num_classes)


def class_weights(task: str, labels: Sequence[Any], num_classes: int) -> torch.Tensor | None:
    """Weights from label counts: binary → ``pos_weight = n_neg / n_pos``; multiclass → ``n / (K · n_k)``;
    multilabel (``labels`` ``(N, K)`` with NaN missing) → per-label ``n_neg / n_pos``; others: none."""
    return task_spec(task).class_weights(labels, num_classes)
