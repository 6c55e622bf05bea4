"""A pretrained backbone plus a new task head, the task's loss and probabilities.

Tasks (``task``):

* ``binary`` — one logit, sigmoid; probabilities ``[1 - p, p]``.
* ``multiclass`` — one logit per class, softmax.
* ``multilabel`` — one logit per label, independent sigmoids; targets ``(N, K)`` in {0, 1} with
  ``NaN`` for a missing label, which is masked out of the loss.
* ``ordinal`` — ``K - 1`` cumulative logits ``P(y > k)`` (CORAL-style); class probabilities are
  differences of the cumulative ones.
* ``regression`` — one output, mean squared error.
* ``auto`` — ``binary`` for two classes, ``multiclass`` otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("auto", "binary", "multiclass", "multilabel", "ordinal", "regression")
HEADS = ("linear", "mlp")


def resolve_task(task: str, num_classes: int) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    if task == "auto":
        return "binary" if num_classes == 2 else "multiclass"
    return task


def num_outputs(task: str, num_classes: int) -> int:
    """Logits the head produces for ``task`` with ``num_classes`` classes (labels for multilabel)."""
    return {"binary": 1, "regression": 1, "ordinal": num_classes - 1}.get(task, num_classes)


def build_head(kind: str, in_features: int, num_outputs: int, dropout: float) -> nn.Module:
    """``linear``: Dropout + Linear.  ``mlp``: the classic target model, Linear(128) + ReLU +
    Dropout(0.5) + Linear."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_outputs))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_outputs))
    raise ValueError(f"unknown head '{kind}' ({', '.join(HEADS)})")


class TransferModel(nn.Module):
    """``backbone`` (pooled features) → ``head`` (logits) for one of the :data:`TASKS`.

    BatchNorm modules that :func:`medtransfer.transfer.apply_plan` marked as fixed stay in
    inference mode (running statistics used, not updated) across ``model.train()``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "linear", dropout: float = 0.2,
                 task: str = "auto"):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.task = resolve_task(task, num_classes)
        self.head = build_head(head, backbone.num_features, num_outputs(self.task, num_classes), dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, num_classes)`` class probabilities (binary: ``[1 - p, p]``; multilabel: one sigmoid
        per label; regression: the prediction itself, ``(N, 1)``)."""
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
        self.task, self.num_classes = members[0].task, members[0].num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x).float() for m in self.members]
        if self.task == "regression":
            return torch.stack(outs).mean(0)
        eps = 1e-7
        if self.task == "multiclass":
            return torch.stack([torch.softmax(o, dim=1) for o in outs]).mean(0).clamp_min(eps).log()
        p = torch.stack([torch.sigmoid(o) for o in outs]).mean(0).clamp(eps, 1 - eps)
        return torch.log(p) - torch.log1p(-p)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return task_probabilities(self.task, logits)


def task_probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if task == "binary":
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    if task == "multiclass":
        return torch.softmax(logits, dim=1)
    if task == "multilabel":
        return torch.sigmoid(logits)
    if task == "ordinal":
        gt = torch.sigmoid(logits)  # P(y > k), k = 0 … K-2
        ones, zeros = torch.ones_like(gt[:, :1]), torch.zeros_like(gt[:, :1])
        cum = torch.cat([ones, gt, zeros], dim=1)
        return (cum[:, :-1] - cum[:, 1:]).clamp_min(0.0)
    return logits.reshape(-1, 1)


def ordinal_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ``t`` → ``[1] * t + [0] * (K - 1 - t)`` (the cumulative targets ``y > k``)."""
    k = torch.arange(num_classes - 1, device=y.device)
    return (y.long().view(-1, 1) > k).float()


class TaskLoss(nn.Module):
    """The loss of a task, with optional per-class weights (see :func:`class_weights`).

    ``binary``: BCE with ``pos_weight``; ``multiclass``: weighted cross-entropy; ``multilabel``:
    BCE per label with ``pos_weight`` per label, NaN targets masked out and the mean taken over the
    observed entries; ``ordinal``: BCE over the cumulative targets; ``regression``: MSE.
    """

    def __init__(self, task: str, num_classes: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.task, self.num_classes = task, num_classes
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits.view(-1), y.float().view(-1), pos_weight=self.weight)
        if self.task == "multiclass":
            return F.cross_entropy(logits, y.long().view(-1), weight=self.weight)
        if self.task == "multilabel":
            y = y.float()
            observed = ~torch.isnan(y)
            raw = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(y, 0.0), reduction="none",
                                                     pos_weight=self.weight)
            return (raw * observed).sum() / observed.sum().clamp_min(1)
        if self.task == "ordinal":
            return F.binary_cross_entropy_with_logits(logits, ordinal_targets(y, self.num_classes))
        return F.mse_loss(logits.view(-1), y.float().view(-1))


def class_weights(task: str, labels, num_classes: int) -> torch.Tensor | None:
    """Weights from label counts: binary → ``pos_weight = n_neg / n_pos``; multiclass → ``n / (K · n_k)``;
    multilabel (``labels`` ``(N, K)`` with NaN missing) → per-label ``n_neg / n_pos``."""
    import numpy as np

    if task == "binary":
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=2).astype(np.float64)
        return torch.tensor([counts[0] / max(counts[1], 1.0)], dtype=torch.float32)
    if task == "multiclass":
        counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
        return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1.0)), dtype=torch.float32)
    if task == "multilabel":
        y = np.asarray(labels, dtype=np.float64)
        pos = np.nansum(y, axis=0)
        neg = np.sum(~np.isnan(y), axis=0) - pos
        return torch.tensor(neg / np.maximum(pos, 1.0), dtype=torch.float32)
    return None


def set_backbone_trainable(model: TransferModel, trainable: bool, bn_policy: str = "frozen") -> None:
    """Freeze or unfreeze the whole backbone (kept for compatibility; see :func:`apply_plan`)."""
    from medtransfer.transfer.plan import apply_plan

    apply_plan(model, "none" if trainable else "backbone", bn_policy=bn_policy)
