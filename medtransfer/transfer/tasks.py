"""Each task in one place: how many outputs its head has, its loss and class weights, how logits
become probabilities, the decision rule at the operating point, and which metrics family scores it.

* ``binary`` — one logit, sigmoid; probabilities ``[1 - p, p]``; positive when ``p ≥ threshold``
  (the validation operating point, 0.5 without one).
* ``multiclass`` — one logit per class, softmax; the most probable class.
* ``multilabel`` — one logit per label, independent sigmoids; targets ``(N, K)`` in {0, 1} with
  ``NaN`` for a missing label (masked out of the loss); every label at or above its own threshold.
* ``ordinal`` — ``K - 1`` cumulative logits ``P(y > k)`` (CORAL-style); class probabilities are
  differences of the cumulative ones; the median grade.

Everything else asks :func:`task_spec` instead of comparing task names.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medtransfer.metrics.classification import ordinal_grade
from medtransfer.options import Task, look_up_option


class TaskSpec:
    """The behaviour of one :class:`~medtransfer.options.Task` (subclasses below, one per task)."""

    task: Task
    metric_task: str | None = None
    """The metrics family that scores it (``binary``, ``multiclass``, ``multilabel``)."""

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
             num_classes: int) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_weights(self, labels: Sequence[Any], num_classes: int) -> torch.Tensor | None:
        return None

    def decide(self, prob: np.ndarray, operating_point: dict[str, Any] | None = None) -> Any:
        """The decision for one row of probabilities (a class index for single-label tasks)."""
        return int(np.argmax(prob))

    def label_text(self, prob: np.ndarray, label_names: list[str], operating_point: dict[str, Any] | None) -> str:
        """The decision as the ``predicted`` column writes it."""
        return label_names[self.decide(prob, operating_point)]


def _counts(labels: Sequence[Any], minlength: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=int), minlength=minlength).astype(np.float64)


class BinaryTask(TaskSpec):
    task, metric_task = Task.BINARY, "binary"

    def outputs(self, num_classes: int) -> int:
        return 1

    def loss(self, logits, y, weight, num_classes):
        return F.binary_cross_entropy_with_logits(logits.float().view(-1), y.float().view(-1), pos_weight=weight)

    def probabilities(self, logits):
        p = torch.sigmoid(logits.float().reshape(-1))
        return torch.stack([1 - p, p], dim=1)

    def class_weights(self, labels, num_classes):
        counts = _counts(labels, 2)
        return torch.tensor([counts[0] / max(counts[1], 1.0)], dtype=torch.float32)

    def decide(self, prob, operating_point=None):
        threshold = (operating_point or {}).get("threshold")
        if not isinstance(threshold, (int, float)):
            return int(np.argmax(prob))
        return int(prob[1] >= threshold)


class MulticlassTask(TaskSpec):
    task, metric_task = Task.MULTICLASS, "multiclass"

    def loss(self, logits, y, weight, num_classes):
        return F.cross_entropy(logits.float(), y.long().view(-1), weight=weight)

    def probabilities(self, logits):
        return torch.softmax(logits.float(), dim=1)

    def class_weights(self, labels, num_classes):
        counts = _counts(labels, num_classes)
        return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1.0)), dtype=torch.float32)


class MultilabelTask(TaskSpec):
    task, metric_task = Task.MULTILABEL, "multilabel"

    def loss(self, logits, y, weight, num_classes):
        y = y.float()
        observed = ~torch.isnan(y)
        raw = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(y, 0.0), reduction="none",
                                                 pos_weight=weight)
        return (raw * observed).sum() / observed.sum().clamp_min(1)

    def probabilities(self, logits):
        return torch.sigmoid(logits.float())

    def class_weights(self, labels, num_classes):
        y = np.asarray(labels, dtype=np.float64)
        pos = np.nansum(y, axis=0)
        neg = np.sum(~np.isnan(y), axis=0) - pos
        return torch.tensor(neg / np.maximum(pos, 1.0), dtype=torch.float32)

    def decide(self, prob, operating_point=None):
        raise TypeError("a multi-label decision is one per label, by name: use label_text()")

    def label_text(self, prob, label_names, operating_point):
        per_label = (operating_point or {}).get("threshold") or {}
        return ";".join(n for n, p in zip(label_names, prob) if p >= float(per_label.get(n, 0.5)))


def ordinal_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ``t`` → ``[1] * t + [0] * (K - 1 - t)`` (the cumulative targets ``y > k``)."""
    k = torch.arange(num_classes - 1, device=y.device)
    return (y.long().view(-1, 1) > k).float()


class OrdinalTask(TaskSpec):
    task, metric_task = Task.ORDINAL, "multiclass"

    def outputs(self, num_classes: int) -> int:
        return num_classes - 1

    def loss(self, logits, y, weight, num_classes):
        return F.binary_cross_entropy_with_logits(logits.float(), ordinal_targets(y, num_classes))

    def probabilities(self, logits):
        gt = torch.sigmoid(logits.float())  # P(y > k), k = 0 … K-2
        ones, zeros = torch.ones_like(gt[:, :1]), torch.zeros_like(gt[:, :1])
        cum = torch.cat([ones, gt, zeros], dim=1)
        return (cum[:, :-1] - cum[:, 1:]).clamp_min(0.0)

    def decide(self, prob, operating_point=None):
        return int(ordinal_grade(np.asarray(prob, dtype=np.float64)[None])[0])


_SPECS: dict[Task, TaskSpec] = {s.task: s for s in (BinaryTask(), MulticlassTask(), MultilabelTask(), OrdinalTask())}


def resolve_task(task: str, num_classes: int) -> Task:
    """``auto`` → binary for two classes, multiclass otherwise; any other task as given."""
    task = look_up_option(task, Task, "model.task")
    if task is Task.AUTO:
        return Task.BINARY if num_classes == 2 else Task.MULTICLASS
    return task


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of a resolved task name."""
    task = look_up_option(task, Task, "model.task")
    if task is Task.AUTO:
        raise ValueError("resolve 'auto' with resolve_task(task, num_classes) first")
    return _SPECS[task]
