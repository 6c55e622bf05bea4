"""The training engine: explicit phases, one ``train_one_epoch``, callbacks around it.

A :class:`Phase` is a stretch of epochs with its own batches and forward (``head`` on cached
features of the frozen backbone, ``finetune`` on images through the whole network, ``encoder_frozen``
for a segmentation decoder, …). :class:`Trainer` runs the phases; every policy — unfreezing, the
learning-rate schedule, plateau, best model, early stopping, the time limit, checkpoints, history,
TensorBoard, the progress bar — is a :class:`~medtransfer.train.callbacks.Callback` with its own
``state_dict``, so ``last.pt`` restores a run exactly. A callback ends training by raising
:class:`StopTraining`.

Order of one epoch::

    on_epoch_start  →  [on_batch_start → forward/backward → (optimizer step → on_step_end) → on_batch_end]*
                    →  validate  →  on_validation_end(metrics)  →  row  →  on_epoch_end(row)
"""
from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from medtransfer.errors import MedTransferError
from medtransfer.utils.distributed import Distributed
from medtransfer.utils.rng import rng_state, set_rng_state


class StopTraining(Exception):
    """Raised by a callback to end :meth:`Trainer.fit` after the current epoch (fastai's
    ``CancelFitException``); ``reason`` is recorded in the trainer's state."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TrainingDiverged(MedTransferError):
    """The loss became NaN or infinite."""


@dataclass
class Phase:
    """A stretch of ``epochs`` epochs trained the same way.

    ``batches()`` returns this epoch's iterable of ``(x, y)``; ``forward`` maps a prepared batch to
    logits (None: the trainer's network, DDP-wrapped when distributed); ``prepare`` turns a batch on
    the device into the network's input (augmentation, normalisation, memory format; None: as is);
    ``validate(epoch)`` returns the epoch's validation metrics (``{}`` on epochs without validation);
    ``info`` is added to every history row of the phase; ``solve()``, when given, fits the model in
    closed form in place of the epoch's optimizer steps and returns the training loss."""

    name: str
    epochs: int
    batches: Callable[[], Iterable[tuple[Any, Any]]]
    validate: Callable[[int], dict[str, float]]
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    solve: Callable[[], float] | None = None


@dataclass
class TrainState:
    """Where training stands: epochs completed, optimizer steps taken, the history rows so far."""

    epoch: int = 0
    step: int = 0
    phase: str = ""
    epochs_planned: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None


def _lr_columns(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The head's learning rate (the last parameter group) as the ``lr`` column."""
    return {"lr": optimizer.param_groups[-1]["lr"]}


class Trainer:
    """Runs :class:`Phase` s of epochs on one model with one optimizer (see the module docstring).

    ``loss_fn(logits, y)``; ``autocast()`` a context factory (mixed precision on CUDA);
    ``scaler`` a ``GradScaler`` (enabled for fp16 only); ``grad_accum`` batches per optimizer step;
    ``generator`` drives shuffling and augmentation and is saved with the RNG state;
    ``lr_columns(optimizer)`` the learning rates a history row records.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[..., torch.Tensor], *,
                 device: torch.device, callbacks: Sequence[Any] = (), autocast: Callable[[], Any] = contextlib.nullcontext,
                 scaler: torch.amp.GradScaler | None = None, grad_accum: int = 1, dist: Distributed = Distributed(),
                 generator: torch.Generator | None = None, samplers: Sequence[Any] = (),
                 lr_columns: Callable[[torch.optim.Optimizer], dict[str, float]] = _lr_columns):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device, self.autocast, self.dist = device, autocast, dist
        self.scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
        self.grad_accum, self.generator = grad_accum, generator or torch.Generator()
        self.samplers, self.lr_columns = list(samplers), lr_columns
        self.callbacks = sorted(callbacks, key=lambda cb: getattr(cb, "order", 50))
        self._handlers: dict[str, list[Callable[..., None]]] = {}
        self.state = TrainState()
        self.net: nn.Module = model
        self._wrapped_for: tuple[bool, ...] | None = None

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, phases: Sequence[Phase]) -> TrainState:
        """Train every phase's epochs (continuing after ``state.epoch`` when resumed); returns the state."""
        self.state.epochs_planned = sum(p.epochs for p in phases)
        self._emit("on_fit_start")
        try:
            with _frozen_heap():
                for phase, epoch in self._schedule(phases):
                    self._run_epoch(phase, epoch)
        except StopTraining as stop:
            self.state.stop_reason = stop.reason
        self._emit("on_fit_end")
        return self.state

    def _schedule(self, phases: Sequence[Phase]) -> Iterator[tuple[Phase, int]]:
        epoch = 0
        for phase in phases:
            for _ in range(phase.epochs):
                epoch += 1
                if epoch > self.state.epoch:  # epochs a resumed run already finished are skipped
                    if phase.name != self.state.phase:
                        self.state.phase = phase.name
                        self._emit("on_phase_start", phase)
                    yield phase, epoch

    def _run_epoch(self, phase: Phase, epoch: int) -> None:
        t0 = time.perf_counter()
        self._emit("on_epoch_start", phase, epoch)
        self._wrap_for_ddp()
        for sampler in self.samplers:
            sampler.set_epoch(epoch)
        train_loss = phase.solve() if phase.solve is not None else self.train_one_epoch(phase)
        metrics = phase.validate(epoch)
        self._emit("on_validation_end", metrics)
        row = {"epoch": epoch, "phase": phase.name, "train_loss": train_loss, **metrics,
               **self.lr_columns(self.optimizer), **phase.info, "seconds": time.perf_counter() - t0}
        self.state.epoch = epoch
        self.state.history.append(row)
        self._emit("on_epoch_end", row)

    def train_one_epoch(self, phase: Phase) -> float:
        """One pass over ``phase.batches()``: autocast forward, scaled backward, an optimizer step every
        ``grad_accum`` batches (DDP gradients synchronised on those only). Returns the mean loss."""
        self.model.train()
        forward = phase.forward or self.net
        batches = phase.batches()
        n, losses = len(batches), []
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(batches):
            x, y = self._to_device(x), self._to_device(y)
            x = phase.prepare(x) if phase.prepare is not None else x
            step_now = (i + 1) % self.grad_accum == 0 or i + 1 == n
            self._emit("on_batch_start")
            with self._no_sync(step_now):
                with self.autocast():
                    loss = self.loss_fn(forward(x), y)
                self._backward(loss)
            if step_now:
                self._optimizer_step()
            losses.append(self._checked(loss))
            self._emit("on_batch_end", losses[-1])
        return float(sum(losses) / max(len(losses), 1))

    def _backward(self, loss: torch.Tensor) -> None:
        scaled = loss / self.grad_accum if self.grad_accum > 1 else loss
        (self.scaler.scale(scaled) if self.scaler.is_enabled() else scaled).backward()

    def _optimizer_step(self) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:  # what a disabled scaler would do, without its per-step bookkeeping
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self._emit("on_step_end")

    def _checked(self, loss: torch.Tensor) -> float:
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"The training loss became {value} at epoch {self.state.epoch + 1}, optimizer step "
                f"{self.state.step} ({self.state.phase} phase). The inputs were checked to be finite when loaded, "
                "so the optimisation diverged: lower train.lr (e.g. --set train.lr=1e-4), or set train.amp=off.")
        return value

    # ---- devices and DDP ----------------------------------------------------------------------
    def _to_device(self, t: Any) -> Any:
        cuda = self.device.type == "cuda"
        return t.to(self.device, non_blocking=cuda) if isinstance(t, torch.Tensor) else t

    def _wrap_for_ddp(self) -> None:
        """DDP hooks only the parameters that train when it wraps the model: wrap again whenever the
        set of trainable parameters changed (after unfreezing)."""
        if self.dist.world == 1:
            return
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable != self._wrapped_for:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self._wrapped_for = trainable

    def _no_sync(self, step_now: bool) -> Any:
        if self.dist.world > 1 and not step_now and isinstance(self.net, nn.parallel.DistributedDataParallel):
            return self.net.no_sync()
        return contextlib.nullcontext()

    # ---- callbacks and state ------------------------------------------------------------------
    def _emit(self, hook: str, *args: Any) -> None:
        handlers = self._handlers.get(hook)
        if handlers is None:  # bound once per hook: the batch hooks run hundreds of times an epoch
            handlers = self._handlers[hook] = [getattr(cb, hook) for cb in self.callbacks]
        for handler in handlers:
            handler(self, *args)

    def state_dict(self) -> dict[str, Any]:
        """Everything ``last.pt`` needs to continue exactly: weights, optimizer, scaler, RNG, progress and
        each callback's own state (by its ``key``)."""
        return {
            "epoch": self.state.epoch, "step": self.state.step, "phase": self.state.phase,
            "history": list(self.state.history), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.generator),
            "callbacks": {cb.key: cb.state_dict() for cb in self.callbacks if cb.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.generator)
        self.state = TrainState(epoch=state["epoch"], step=state["step"], phase=state["phase"],
                                history=list(state["history"]))
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.key in saved:
                cb.load_state_dict(saved[cb.key])


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Move every object alive before training out of the garbage collector's reach while the epochs
    run. After torch, sklearn and matplotlib are imported a process tracks ~0.5 M objects, and each
    full collection walked them all (~150 ms, several times per run); the loop itself creates few
    long-lived objects, so nothing is lost by not scanning the old ones."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
