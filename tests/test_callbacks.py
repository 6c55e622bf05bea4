"""Training policies tested on a dummy trainer (scripted validation scores, a fake clock), and the
Trainer itself on a two-parameter model: no data, no backbone."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medtransfer.train import callbacks as cb
from medtransfer.train.trainer import Phase, StopTraining, Trainer, TrainingDiverged, TrainState


def dummy_trainer(model=None, epochs_planned=10, phase="finetune"):
    model = model or nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    return SimpleNamespace(model=model, optimizer=opt, state=TrainState(epochs_planned=epochs_planned, phase=phase))


def rows(aucs, losses=None, phase="finetune"):
    losses = losses or [1.0] * len(aucs)
    return [{"epoch": i + 1, "phase": phase, "val_auc": a, "val_loss": v, "seconds": 1.0}
            for i, (a, v) in enumerate(zip(aucs, losses))]


def test_early_stopping_counts_epochs_without_improvement():
    stop, tr = cb.EarlyStopping("val_auc", patience=2, tiebreak="val_loss"), dummy_trainer()
    stop.on_epoch_end(tr, rows([0.5])[0])
    stop.on_epoch_end(tr, rows([0.5, 0.6])[1])
    stop.on_epoch_end(tr, rows([0.5, 0.6, 0.55])[2])
    assert stop.stale == 1
    with pytest.raises(StopTraining, match="early stopping"):
        stop.on_epoch_end(tr, rows([0.5, 0.6, 0.55, 0.59])[3])


def test_early_stopping_waits_for_its_phase_and_breaks_ties_on_the_loss():
    stop, tr = cb.EarlyStopping("val_auc", patience=1, tiebreak="val_loss"), dummy_trainer()
    head = rows([0.7, 0.6], phase="head")
    stop.on_epoch_end(tr, head[0])
    stop.on_epoch_end(tr, head[1])  # worse, but in the head phase: counted, no stop
    assert stop.stale == 1
    tie = {"epoch": 3, "phase": "finetune", "val_auc": 0.7, "val_loss": 0.5, "seconds": 1.0}
    stop.on_epoch_end(tr, tie)  # same AUC, lower loss: an improvement
    assert stop.stale == 0
    restored = cb.EarlyStopping("val_auc", patience=1, tiebreak="val_loss")
    restored.load_state_dict(stop.state_dict())
    with pytest.raises(StopTraining):
        restored.on_epoch_end(tr, {**tie, "epoch": 4, "val_loss": 0.6})


def test_best_model_restores_the_weights_of_the_best_epoch():
    model = nn.Linear(1, 1, bias=False)
    tr, best = dummy_trainer(model), cb.BestModel("val_auc", tiebreak="val_loss")
    best.on_fit_start(tr)
    for row, w in zip(rows([0.6, 0.8, 0.7]), (1.0, 2.0, 3.0)):
        model.weight.data.fill_(w)
        best.on_epoch_end(tr, row)
    assert best.epoch == 2
    best.on_fit_end(tr)
    assert model.weight.item() == 2.0


def test_best_model_skips_epochs_without_validation():
    tr, best = dummy_trainer(), cb.BestModel("val_dice_mean")
    best.on_fit_start(tr)
    best.on_epoch_end(tr, {"epoch": 1, "phase": "finetune"})
    best.on_epoch_end(tr, {"epoch": 2, "phase": "finetune", "val_dice_mean": 0.4})
    assert best.epoch == 2


def test_time_limit_stops_before_an_epoch_that_would_not_fit():
    now = {"t": 100.0}
    limit = cb.TimeLimit(deadline=130.0, final_seconds=lambda: 10.0, clock=lambda: now["t"])
    tr = dummy_trainer(epochs_planned=5)
    limit.on_epoch_end(tr, {"epoch": 1, "seconds": 10.0})  # 100 + 10 + 10 <= 130
    now["t"] = 115.0
    with pytest.raises(StopTraining, match="time limit"):
        limit.on_epoch_end(tr, {"epoch": 2, "seconds": 10.0})  # 115 + 10 + 10 > 130
    assert limit.stopped
    last = cb.TimeLimit(deadline=0.0, final_seconds=lambda: 10.0, clock=lambda: 1e9)
    last.on_epoch_end(tr, {"epoch": 5, "seconds": 1.0})  # the last planned epoch never stops


def test_time_limit_waits_for_an_estimate():
    limit = cb.TimeLimit(deadline=0.0, final_seconds=lambda: None, clock=lambda: 1e9)
    limit.on_epoch_end(dummy_trainer(), {"epoch": 1, "seconds": 1.0})


def test_lr_schedule_starts_with_its_phase_and_resumes_exactly():
    tr = dummy_trainer()
    sched = cb.LRSchedule(cb.cosine_factor, total=4, phases=("finetune",))
    sched.on_phase_start(tr, SimpleNamespace(name="head"))
    sched.on_step_end(tr)
    assert tr.optimizer.param_groups[0]["lr"] == 1.0  # not started in the head phase
    sched.on_phase_start(tr, SimpleNamespace(name="finetune"))
    lrs = []
    for _ in range(2):
        sched.on_step_end(tr)
        lrs.append(tr.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi / 4)), 0.5])
    again = cb.LRSchedule(cb.cosine_factor, total=4, phases=("finetune",))
    again.load_state_dict(sched.state_dict())
    again.on_step_end(tr)
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))


def test_onecycle_warms_up_then_decays():
    assert cb.onecycle_factor(0, 10) == pytest.approx(1 / 25)
    assert cb.onecycle_factor(3, 10) == pytest.approx(1.0)
    assert cb.onecycle_factor(10, 10) == pytest.approx(1e-4)


def test_unfreeze_applies_a_plan_only_when_it_changes():
    calls = []
    un = cb.Unfreeze(lambda e: ("backbone",) if e <= 2 else ("none",), lambda model, *plan: calls.append(plan))
    tr = dummy_trainer()
    for epoch in (1, 2, 3, 4):
        un.on_epoch_start(tr, None, epoch)
    assert calls == [("backbone",), ("none",)]


def _model():
    torch.manual_seed(0)
    return nn.Linear(1, 1)


def _trainer(model, extra=()):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(model, opt, nn.functional.mse_loss, device=torch.device("cpu"), callbacks=[
        cb.LRSchedule(cb.cosine_factor, total=12), cb.BestModel("val_loss", mode="min"), *extra])


def _phases(x, y, model):
    batches = lambda: [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]  # noqa: E731
    val = lambda epoch: {"val_loss": float(nn.functional.mse_loss(model(x), y).detach())}  # noqa: E731
    return [Phase("finetune", 4, batches, val)]


def test_trainer_state_dict_resumes_to_the_same_weights():
    x = torch.linspace(-1, 1, 12).view(-1, 1)
    y = 3 * x + 1
    a = _model()
    ta = _trainer(a)
    ta.fit(_phases(x, y, a))

    b = _model()
    stopper = cb.Callback()
    stopper.on_epoch_end = lambda trainer, row: (_ for _ in ()).throw(StopTraining("test")) if row["epoch"] == 2 else None
    tb = _trainer(b, [stopper])
    tb.fit(_phases(x, y, b))
    assert tb.state.stop_reason == "test" and tb.state.epoch == 2
    saved = tb.state_dict()

    c = nn.Linear(1, 1)  # any initial weights: the state holds them
    tc = _trainer(c)
    tc.load_state_dict(saved)
    state = tc.fit(_phases(x, y, c))
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4]
    assert [r["val_loss"] for r in state.history] == pytest.approx([r["val_loss"] for r in ta.state.history])
    torch.testing.assert_close(c.weight, a.weight)
    torch.testing.assert_close(c.bias, a.bias)


def test_a_nan_loss_stops_with_a_message_naming_the_step():
    model = nn.Linear(1, 1)
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.functional.mse_loss, device=torch.device("cpu"))
    x = torch.tensor([[float("nan")]])
    with pytest.raises(TrainingDiverged, match="epoch 1, optimizer step 1 .*lower train.lr"):
        tr.fit([Phase("finetune", 1, lambda: [(x, x)], lambda epoch: {})])
