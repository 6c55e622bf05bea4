"""Validation passes of a classification run: over images (timed, so that a time limit can budget
the final evaluation), or over features of the frozen backbone computed once (the feature cache)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from medtransfer.evaluation import predict_loader, selection_auc


class Validation:
    """``images()`` / ``features()`` → ``{"val_loss", "val_auc"}`` of the model as it is now."""

    def __init__(self, setup: Any, prep: Any):
        self.setup = setup
        labels = np.array([s.label for s in prep.subset("val")])
        dtype = torch.float32 if labels.ndim == 2 else torch.int64
        self.y = torch.tensor(labels, dtype=dtype, device=setup.device)
        self.n_val, self.n_test = len(prep.subset("val")), len(prep.subset("test"))
        self.full_pass_seconds: float | None = None
        self._feature_loaders: dict[str, DataLoader] | None = None

    def images(self, epoch: int = 0) -> dict[str, float]:
        s = self.setup
        t0 = time.perf_counter()
        prob, logit = predict_loader(s.model, s.eval_loaders["val"], s.pre, s.device, None, s.autocast)
        self.full_pass_seconds = time.perf_counter() - t0
        return self._score(prob, logit)

    def features(self, epoch: int = 0) -> dict[str, float]:
        s = self.setup
        loader = self.feature_loaders()["val"]
        return self._score(*predict_loader(s.model, loader, None, s.device, s.model.head, s.autocast))

    def _score(self, prob: np.ndarray, logit: np.ndarray) -> dict[str, float]:
        with torch.no_grad():
            val_loss = float(self.setup.loss_fn(torch.from_numpy(logit).to(self.setup.device), self.y))
        return {"val_loss": val_loss, "val_auc": selection_auc(self.y.cpu().numpy(), prob, self.setup.model.task)}

    def final_pass_estimate(self, report_seconds: float) -> Callable[[], float | None]:
        """Seconds of the final val + test pass and report, from the last full validation pass."""
        def estimate() -> float | None:
            if self.full_pass_seconds is None:
                return None
            return self.full_pass_seconds * (self.n_val + self.n_test) / self.n_val + report_seconds
        return estimate

    @torch.no_grad()
    def feature_loaders(self) -> dict[str, DataLoader]:
        """Pooled features of the frozen backbone (inference mode) for the training and validation
        images, computed on first use, as loaders for the head."""
        if self._feature_loaders is None:
            s = self.setup
            s.model.eval()
            train, batch = s.train_loader, s.train_loader.batch_size
            ordered = DataLoader(train.dataset, batch_size=batch, shuffle=False, num_workers=train.num_workers,
                                 pin_memory=train.pin_memory)
            self._feature_loaders = {
                "train": DataLoader(self._features(ordered), batch_size=batch, shuffle=True, generator=s.generator,
                                    drop_last=train.drop_last),
                "val": DataLoader(self._features(s.eval_loaders["val"]), batch_size=batch, shuffle=False),
            }
        return self._feature_loaders

    def _features(self, loader: DataLoader) -> TensorDataset:
        s = self.setup
        xs, ys = [], []
        for x, y in loader:
            with s.autocast():
                xs.append(s.model.backbone(s.pre.normalize(x.to(s.device))).float())
            ys.append(y.to(s.device))
        return TensorDataset(torch.cat(xs), torch.cat(ys))
