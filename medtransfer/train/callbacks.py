"""Training policies, one class each, around :class:`~medtransfer.train.trainer.Trainer`.

Each callback has a ``key`` (its entry in ``last.pt``), an ``order`` (lower runs first: trackers,
then writers, then the last checkpoint, then the callbacks that stop training, so the state of an
epoch is saved before a stop), and ``state_dict`` / ``load_state_dict`` so a resumed run continues
exactly. They can be tested on a dummy trainer: most read only ``trainer.state``, ``trainer.model``
and ``trainer.optimizer``.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medtransfer.train.trainer import Phase, StopTraining

logger = logging.getLogger(__name__)


class Callback:
    """No-op hooks; subclasses override what they need."""

    key = "callback"
    order = 50

    def on_fit_start(self, trainer: Any) -> None: ...
    def on_phase_start(self, trainer: Any, phase: Phase) -> None: ...
    def on_epoch_start(self, trainer: Any, phase: Phase, epoch: int) -> None: ...
    def on_batch_start(self, trainer: Any) -> None: ...
    def on_step_end(self, trainer: Any) -> None: ...
    def on_batch_end(self, trainer: Any, loss: float) -> None: ...
    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: Any, row: dict[str, Any]) -> None: ...
    def on_fit_end(self, trainer: Any) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ---- transfer plan ------------------------------------------------------------------------------
class Unfreeze(Callback):
    """Sets what trains at the start of every epoch: ``plan_for(epoch)`` returns the arguments of
    :func:`medtransfer.transfer.apply_plan` (a hashable tuple), applied when they change. Stateless:
    the plan is a function of the epoch, so a resumed run re-derives it."""

    key = "unfreeze"
    order = 0

    def __init__(self, plan_for: Callable[[int], tuple[Any, ...]], apply: Callable[..., Any]):
        self.plan_for, self.apply = plan_for, apply
        self._applied: tuple[Any, ...] | None = None

    def on_epoch_start(self, trainer, phase, epoch):
        plan = self.plan_for(epoch)
        if plan != self._applied:
            self.apply(trainer.model, *plan)
            self._applied = plan


class LRSchedule(Callback):
    """A per-step multiplier of each parameter group's learning rate, ``lr = base × factor(t)`` after
    ``t`` optimizer steps, starting when one of ``phases`` starts (``base``: the groups' learning rates
    then). Over ``total`` steps; what ``torch``'s ``LambdaLR`` does, with its counter in ``state_dict``."""

    key = "lr_schedule"
    order = 0

    def __init__(self, factor: Callable[[int, int], float], total: int, phases: Sequence[str] | None = None):
        self.factor, self.total, self.phases = factor, total, phases
        self.t = 0
        self.base: list[float] | None = None

    def on_phase_start(self, trainer, phase):
        if self.base is None and (self.phases is None or phase.name in self.phases):
            self.base = [g["lr"] for g in trainer.optimizer.param_groups]
            self._apply(trainer.optimizer)

    def on_fit_start(self, trainer):
        if self.base is None and self.phases is None:
            self.base = [g["lr"] for g in trainer.optimizer.param_groups]
        if self.base is not None:
            self._apply(trainer.optimizer)

    def on_step_end(self, trainer):
        if self.base is not None:
            self.t += 1
            self._apply(trainer.optimizer)

    def _apply(self, optimizer: torch.optim.Optimizer) -> None:
        f = self.factor(self.t, self.total)
        for group, base in zip(optimizer.param_groups, self.base):
            group["initial_lr"] = base
            group["lr"] = base * f

    def state_dict(self):
        return {"t": self.t, "base": self.base} if self.base is not None else {}

    def load_state_dict(self, state):
        self.t, self.base = state["t"], state["base"]


def cosine_factor(t: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps."""
    return 0.5 * (1 + math.cos(math.pi * min(t, total) / max(total, 1)))


def onecycle_factor(t: int, total: int) -> float:
    """Linear warm-up from 1/25 over 30% of the steps, then cosine down to 1e-4."""
    warm = max(int(0.3 * total), 1)
    if t < warm:
        return 1 / 25 + (1 - 1 / 25) * t / warm
    frac = min(t - warm, total - warm) / max(total - warm, 1)
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))


class Plateau(Callback):
    """``ReduceLROnPlateau`` on a validation metric, stepped after validation in ``phases``."""

    key = "plateau"
    order = 0

    def __init__(self, optimizer: torch.optim.Optimizer, monitor: str, mode: str, factor: float, patience: int,
                 min_lr: float, phases: Sequence[str] = ("finetune",)):
        self.monitor, self.phases = monitor, tuple(phases)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=factor,
                                                                    patience=patience, min_lr=min_lr)

    def on_validation_end(self, trainer, metrics):
        if trainer.state.phase in self.phases and self.monitor in metrics:
            self.scheduler.step(metrics[self.monitor])

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


# ---- trackers: monitor, compare, act ------------------------------------------------------------
class Tracker:
    """Whether a history row improves on the best so far: ``monitor`` higher (``mode='max'``) or lower;
    a tie (or an undefined value) is broken by ``tiebreak`` (lower is better, e.g. the validation
    loss). Rows without ``monitor`` (epochs without validation) are not judged."""

    def __init__(self, monitor: str, mode: str = "max", tiebreak: str | None = None):
        self.monitor, self.sign, self.tiebreak = monitor, 1.0 if mode == "max" else -1.0, tiebreak
        self.best, self.best_tie = -math.inf, math.inf

    def judged(self, row: dict[str, Any]) -> bool:
        return self.monitor in row

    def improves(self, row: dict[str, Any]) -> bool:
        value = self.sign * float(row[self.monitor])
        tie = float(row[self.tiebreak]) if self.tiebreak and self.tiebreak in row else math.inf
        better = value > self.best or ((math.isnan(value) or value == self.best) and tie < self.best_tie)
        if better:
            self.best = value if not math.isnan(value) else self.best
            self.best_tie = tie
        return better

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "best_tie": self.best_tie}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best, self.best_tie = state["best"], state["best_tie"]


class BestModel(Callback):
    """Keeps a copy of the weights of the best epoch on validation and puts them back at the end."""

    key = "best_model"
    order = 10

    def __init__(self, monitor: str, mode: str = "max", tiebreak: str | None = None):
        self.tracker = Tracker(monitor, mode, tiebreak)
        self.weights: dict[str, torch.Tensor] | None = None
        self.epoch = 0

    def on_fit_start(self, trainer):
        if self.weights is None:
            self.weights = snapshot(trainer.model)

    def on_epoch_end(self, trainer, row):
        if self.tracker.judged(row) and self.tracker.improves(row):
            self.weights, self.epoch = snapshot(trainer.model), row["epoch"]

    def on_fit_end(self, trainer):
        if self.weights is not None:
            trainer.model.load_state_dict(self.weights)

    def state_dict(self):
        return {"tracker": self.tracker.state_dict(), "weights": self.weights, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.tracker.load_state_dict(state["tracker"])
        self.weights, self.epoch = state["weights"], state["epoch"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (``copy.deepcopy`` of a state dict costs ~10x more on small models)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class EarlyStopping(Callback):
    """Stops after ``patience`` judged epochs without improvement, in ``phases`` only (the epochs of
    other phases count towards the patience, as they did before the Trainer)."""

    key = "early_stopping"
    order = 100

    def __init__(self, monitor: str, patience: int, mode: str = "max", tiebreak: str | None = None,
                 phases: Sequence[str] = ("finetune",)):
        self.tracker, self.patience, self.phases = Tracker(monitor, mode, tiebreak), patience, tuple(phases)
        self.stale = 0

    def on_epoch_end(self, trainer, row):
        if not self.tracker.judged(row):
            return
        self.stale = 0 if self.tracker.improves(row) else self.stale + 1
        if self.stale >= self.patience and row["phase"] in self.phases:
            logger.info("early stopping after %d epochs without a better %s", self.stale, self.tracker.monitor)
            raise StopTraining("early stopping")

    def state_dict(self):
        return {"tracker": self.tracker.state_dict(), "stale": self.stale}

    def load_state_dict(self, state):
        self.tracker.load_state_dict(state["tracker"])
        self.stale = state["stale"]


class TimeLimit(Callback):
    """Stops before an epoch that would not finish, with the final evaluation, by ``deadline`` (a
    ``time.perf_counter()`` instant). ``final_seconds()`` estimates the final evaluation (None while
    unknown: no decision yet); ``clock`` is replaceable in tests."""

    key = "time_limit"
    order = 100

    def __init__(self, deadline: float, final_seconds: Callable[[], float | None],
                 clock: Callable[[], float] = time.perf_counter):
        self.deadline, self.final_seconds, self.clock = deadline, final_seconds, clock
        self.stopped = False

    def on_epoch_end(self, trainer, row):
        final = self.final_seconds()
        if row["epoch"] >= trainer.state.epochs_planned or final is None:
            return
        if self.clock() + row["seconds"] + final > self.deadline:
            self.stopped = True
            logger.warning("time limit: stopping after epoch %d of %d (train.time_limit_minutes); the best "
                           "epoch on validation so far is kept", row["epoch"], trainer.state.epochs_planned)
            raise StopTraining("time limit")


class DatasetState(Callback):
    """Saves and restores the random state of a dataset that samples its own items (random patches),
    so a resumed run draws what the uninterrupted one would have."""

    key = "dataset"
    order = 0

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def state_dict(self):
        return self.dataset.state_dict()

    def load_state_dict(self, state):
        self.dataset.load_state_dict(state)


# ---- writers ------------------------------------------------------------------------------------
class History(Callback):
    """Logs every epoch and rewrites ``history.csv`` through the run directory."""

    key = "history"
    order = 20

    def __init__(self, run_dir: Any, describe: Callable[[dict[str, Any]], str]):
        self.run_dir, self.describe = run_dir, describe

    def on_epoch_end(self, trainer, row):
        logger.info("epoch %d (%s): %s", row["epoch"], row["phase"], self.describe(row))
        self.run_dir.write_rows("history.csv", trainer.state.history)


class TensorBoard(Callback):
    """Scalars of every epoch into ``RUN_DIR/tensorboard`` (needs the tensorboard package)."""

    key = "tensorboard"
    order = 20

    def __init__(self, log_dir: str, keys: Sequence[str]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.keys = SummaryWriter(log_dir), tuple(keys)

    def on_epoch_end(self, trainer, row):
        for key in self.keys:
            if key in row:
                self.writer.add_scalar(key, row[key], row["epoch"])

    def on_fit_end(self, trainer):
        self.writer.close()


class LastCheckpoint(Callback):
    """``last.pt`` after every epoch: the trainer's state (with every callback's) plus ``extra``
    (config, data paths) so that ``--resume RUN_DIR`` needs nothing else."""

    key = "last_checkpoint"
    order = 90

    def __init__(self, run_dir: Any, extra: dict[str, Any]):
        self.run_dir, self.extra = run_dir, extra

    def on_epoch_end(self, trainer, row):
        self.run_dir.save_last({**trainer.state_dict(), **self.extra})


class ProgressBar(Callback):
    """A Rich progress bar over every batch of the run, with the phase, epoch and latest numbers."""

    key = "progress"
    order = 30

    def __init__(self, batches_per_epoch: int, enabled: bool = True, status: Callable[[dict[str, Any]], str] | None = None):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.per_epoch, self.status = batches_per_epoch, status
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not enabled,
                            transient=False)
        self.task: Any = None

    def on_fit_start(self, trainer):
        self.bar.start()
        self.task = self.bar.add_task("training", total=trainer.state.epochs_planned * self.per_epoch,
                                      completed=trainer.state.epoch * self.per_epoch, status="")

    def on_batch_end(self, trainer, loss):
        self.bar.update(self.task, advance=1, status=f"{trainer.state.phase} epoch {trainer.state.epoch + 1} "
                                                     f"loss {loss:.3f}")

    def on_epoch_end(self, trainer, row):
        if self.status is not None:
            self.bar.update(self.task, status=f"{row['phase']} epoch {row['epoch']} {self.status(row)}")

    def on_fit_end(self, trainer):
        self.bar.stop()
