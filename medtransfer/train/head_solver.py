"""The head fitted in closed form (``train.head_solver=logistic``): an L2-regularised logistic regression
on the frozen backbone's cached features, folded into the model's linear head.

A few hundred labelled volumes or images and hundreds of feature dimensions are the regime where a
linear probe needs strong, well-chosen regularisation: gradient epochs on raw features stop wherever
the epoch budget ends, while the regularised optimum is one convex problem. The features are
standardised (per dimension, on the training rows), the regularisation strength ``C`` is chosen from
``C_GRID`` on the validation AUC (or, without a validation split, by stratified 3-fold cross-validation
on the training rows), and the standardisation is folded into the weights, so the saved model is the
plain ``Dropout + Linear`` head of any other run::

    logit = w · (x - mu) / sd + b  =  (w / sd) · x + (b - Σ w mu / sd)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medtransfer.errors import ConfigError, DataError
from medtransfer.evaluation import selection_auc
from medtransfer.options import Task

logger = logging.getLogger(__name__)

C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""Inverse regularisation strengths tried (scikit-learn's ``C``; features standardised)."""
_SD_FLOOR = 1e-6
"""Feature dimensions that do not vary over the training rows are left unscaled (divided by 1)."""


@dataclass
class LogisticHead:
    """The fit: its ``C``, the selection AUC of every ``C`` tried, and how ``C`` was chosen."""

    C: float
    scores: dict[float, float] = field(default_factory=dict)
    chosen_on: str = "val"

    def summary(self) -> str:
        grid = ", ".join(f"{c:g}: {s:.4f}" for c, s in self.scores.items())
        return f"logistic head: C = {self.C:g} (AUC on {self.chosen_on} by C: {grid})"


def final_linear(head: nn.Module) -> nn.Linear:
    """The Linear layer of a ``Dropout + Linear`` head; ConfigError for any other head."""
    layers = list(head.children()) if isinstance(head, nn.Sequential) else []
    if len(layers) == 2 and isinstance(layers[0], nn.Dropout) and isinstance(layers[1], nn.Linear):
        return layers[1]
    raise ConfigError("train.head_solver = logistic fits a linear head on pooled features; this model's head is "
                      f"{type(head).__name__} (an MLP head, or the pooling of a slice encoder). Set model.head=linear "
                      "with a backbone that pools its own features, or use train.head_solver=sgd.")


def fit_logistic_head(head: nn.Module, task: str, train: tuple[np.ndarray, np.ndarray],
                      val: tuple[np.ndarray, np.ndarray] | None, balanced: bool) -> LogisticHead:
    """Set ``head``'s Linear layer to the best logistic regression of ``train`` = (features, labels);
    ``val`` chooses ``C`` (None: cross-validation on ``train``); ``balanced`` weights the classes
    inversely to their frequency (as ``train.class_weighting`` does for the loss)."""
    if task not in (Task.BINARY, Task.MULTICLASS):
        raise ConfigError(f"train.head_solver = logistic fits binary and multi-class heads; this run's task is "
                          f"{task}. Use train.head_solver=sgd.")
    linear = final_linear(head)
    x, y = train[0].astype(np.float64), np.asarray(train[1]).astype(np.int64)
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > _SD_FLOOR, sd, 1.0)
    scale = lambda f: (f.astype(np.float64) - mu) / sd  # noqa: E731
    if val is not None:
        scores = {c: _val_auc(c, scale(x), y, scale(val[0]), np.asarray(val[1]), task, balanced) for c in C_GRID}
        chosen_on = "val"
    else:
        scores = {c: _cv_auc(c, scale(x), y, task, balanced) for c in C_GRID}
        chosen_on = "3-fold cross-validation on train"
    best = max(scores, key=lambda c: (np.nan_to_num(scores[c], nan=-1.0), -c))  # ties: the stronger penalty
    clf = _classifier(best, balanced).fit(scale(x), y)
    _fold_into(linear, clf.coef_, clf.intercept_, mu, sd)
    fit = LogisticHead(best, scores, chosen_on)
    logger.info(fit.summary())
    return fit


def _classifier(c: float, balanced: bool):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None)


def _val_auc(c: float, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, task: str,
             balanced: bool) -> float:
    return selection_auc(yv, _classifier(c, balanced).fit(x, y).predict_proba(xv), task)


def _cv_auc(c: float, x: np.ndarray, y: np.ndarray, task: str, balanced: bool) -> float:
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_splits=min(3, int(np.bincount(y).min())), shuffle=True, random_state=0)
    return float(np.nanmean([_val_auc(c, x[a], y[a], x[b], y[b], task, balanced) for a, b in folds.split(x, y)]))


def _fold_into(linear: nn.Linear, coef: np.ndarray, intercept: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> None:
    """``linear`` ← the regression on standardised features, expressed on the raw features."""
    if coef.shape[0] != linear.out_features:
        raise DataError(f"The logistic head has {coef.shape[0]} outputs but the model {linear.out_features}: some "
                        "class has no training image. Every class needs training examples (check the labels and "
                        "data.train_fraction).")
    weight = coef / sd
    bias = intercept - (coef * mu / sd).sum(1)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))
