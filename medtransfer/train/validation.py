"""Validation passes of a classification run: over images (timed, so that a time limit can budget
the final evaluation), or over features of the frozen backbone computed once (the feature cache)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medtransfer.evaluation import predict_loader, selection_auc
from medtransfer.train.feature_store import FeatureStore, extract_features


class Validation:
    """``images()`` / ``features()`` → ``{"val_loss", "val_auc"}`` of the model as it is now. Cached
    features live in ``cache_dir`` (inside the run directory) while the run lasts."""

    def __init__(self, setup: Any, prep: Any, cache_dir: Path, progress: bool = False, reuse: bool = False):
        self.setup, self.cache_dir, self.progress, self.reuse = setup, Path(cache_dir), progress, reuse
        self.feature_seconds: float | None = None
        labels = np.array([s.label for s in prep.subset("val")])
        dtype = torch.float32 if labels.ndim == 2 else torch.int64
        self.y = torch.tensor(labels, dtype=dtype, device=setup.device)
        self.n_val, self.n_test = len(prep.subset("val")), len(prep.subset("test"))
        self.full_pass_seconds: float | None = None
        self._feature_loaders: dict[str, DataLoader] | None = None
        self._stores: dict[str, FeatureStore] = {}

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

    def feature_loaders(self) -> dict[str, DataLoader]:
        """Pooled features of the frozen backbone (inference mode) for the training and validation
        images (when the fit has a validation split), computed on first use and streamed to disk in chunks
        (so a set larger than memory works), as loaders for the head."""
        if self._feature_loaders is None:
            s = self.setup
            train, batch = s.train_loader, s.train_loader.batch_size
            ordered = DataLoader(train.dataset, batch_size=batch, shuffle=False, num_workers=train.num_workers,
                                 pin_memory=train.pin_memory)
            passes = [("train", ordered)] + ([("val", s.eval_loaders["val"])] if "val" in s.eval_loaders else [])
            stores = self._stores = {name: self._extract(loader, name) for name, loader in passes}
            self.feature_seconds = sum(st.seconds for st in stores.values())
            self._feature_loaders = {
                "train": DataLoader(stores["train"].dataset(), batch_size=batch, shuffle=True, generator=s.generator,
                                    drop_last=train.drop_last),
            }
            if "val" in stores:
                self._feature_loaders["val"] = DataLoader(stores["val"].dataset(), batch_size=batch, shuffle=False)
        return self._feature_loaders

    def feature_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"train": (features, labels)[, "val": …]}`` of the cache, in memory (for a closed-form head)."""
        self.feature_loaders()
        return {name: (store.features(), store.labels()) for name, store in self._stores.items()}

    def _extract(self, loader: DataLoader, name: str) -> FeatureStore:
        s = self.setup
        if self.reuse and (self.cache_dir / name / "index.json").is_file():
            store = FeatureStore.open(self.cache_dir / name)  # written by an earlier fit (ensemble member)
            if len(store) == len(loader.dataset):
                return store
        return extract_features(lambda x: s.model.backbone(s.pre.normalize(x)), loader, self.cache_dir / name,
                                device=s.device, autocast_dtype=s.amp_dtype, progress=self.progress,
                                description=f"frozen features ({name})")
