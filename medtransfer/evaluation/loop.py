"""Probabilities of a model for every sample of a loader, in dataset order (DDP shards gathered)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from medtransfer.data.preprocess import Preprocessor
from medtransfer.data.samples import Sample
from medtransfer.metrics import roc_auc
from medtransfer.transfer.tasks import task_spec
from medtransfer.utils.distributed import gather_shards


@torch.no_grad()
def predict_loader(
    model: torch.nn.Module, loader: DataLoader, pre: Preprocessor | None, device: torch.device,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(N, C)`` and logits for every sample of ``loader``, in dataset order.

    ``forward`` replaces ``model`` (e.g. ``model.head`` over cached features; ``pre`` is then None).
    Under DDP with a :class:`DistributedSampler`, each rank predicts its shard and the shards are
    gathered, so every rank returns the whole set.
    """
    model.eval()
    forward = forward or model
    probs, logits = [], []
    for x, _ in loader:
        x = x.to(device)
        with autocast():
            out = forward(pre.normalize(x) if pre is not None else x)
        logits.append(out.float().cpu())
        probs.append(model.probabilities(out).cpu())
    prob, logit = torch.cat(probs).numpy(), torch.cat(logits).numpy()
    if isinstance(loader.sampler, DistributedSampler):
        prob, logit = gather_shards(prob, len(loader.dataset)), gather_shards(logit, len(loader.dataset))
    return prob, logit


def labelled_results(samples: list[Sample], prob: np.ndarray) -> dict[str, Any]:
    """What the metrics report takes for one split: labels, probabilities, patients and paths."""
    return {"y": np.array([s.label for s in samples]), "prob": prob,
            "patient_ids": [s.patient_id for s in samples], "paths": [s.path for s in samples]}


def selection_auc(y: np.ndarray, prob: np.ndarray, task: str) -> float:
    """Validation AUC for model selection (binary, or macro one-vs-rest); NaN when undefined."""
    return float(roc_auc(y, prob, task=task_spec(task).metric_task))
