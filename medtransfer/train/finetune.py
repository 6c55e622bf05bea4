"""The fine-tuning recipe, the package's main entry point: :func:`finetune`.

A new run prepares its data (:func:`~medtransfer.train.classifier.prepare`), resolves its ``auto``
settings, writes ``config.yaml`` once, and fits one model (:func:`~medtransfer.train.classifier.fit_classifier`)
or an ensemble of them (:mod:`medtransfer.train.ensemble`); ``resume`` continues an interrupted run
from its ``last.pt``. See :mod:`medtransfer.train.classifier` for the steps of one fit.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any

from medtransfer.config import RunConfig, config_from_dict
from medtransfer.data.samples import SampleTable
from medtransfer.run import RunDirectory, default_run_dir
from medtransfer.train import callbacks as cb
from medtransfer.train.classifier import FinetuneResult, fit_classifier, prepare, resolve_auto
from medtransfer.train.ensemble import finetune_ensemble
from medtransfer.utils.device import pick_device
from medtransfer.utils.distributed import broadcast, init_distributed, rank_device

__all__ = ["FinetuneResult", "finetune"]


def finetune(
    cfg: RunConfig,
    data: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    resume: str | os.PathLike[str] | None = None,
    samples: SampleTable | None = None,
    deadline: float | None = None,
    overwrite: bool = False,
    callbacks: tuple[cb.Callback, ...] = (),
) -> FinetuneResult:
    """Run the whole recipe (see the module docstring) and write the run directory.

    ``resume``: a run directory whose ``last.pt`` is continued exactly (its config and data are
    used; ``cfg`` is ignored). ``samples``: a ready samples table (e.g. one cross-validation fold)
    instead of ``data``/``labels``. ``deadline``: a ``time.perf_counter()`` instant by which the run
    must be done (an ensemble passes its own to the members); otherwise ``train.time_limit_minutes``
    from now, if set. ``overwrite``: replace an earlier run in ``out_dir`` (otherwise a folder that
    holds files is refused). ``callbacks``: extra :class:`~medtransfer.train.callbacks.Callback` s.
    """
    if deadline is None and cfg.train.time_limit_minutes > 0 and resume is None:
        deadline = time.perf_counter() + 60 * cfg.train.time_limit_minutes
    if resume is not None:
        return _resume(resume, data, labels, samples, progress, callbacks)
    device = pick_device(cfg.train.device)
    dist = init_distributed(device)
    run = RunDirectory(broadcast(str(out_dir or default_run_dir(cfg.modality)), dist), dist.main)
    if cfg.train.ensemble > 1:
        return finetune_ensemble(cfg, data, labels, run.open_new(overwrite), progress, samples, deadline, dist)
    prep = prepare(cfg, data, labels, samples)
    prep = replace(prep, cfg=resolve_auto(prep.cfg))
    run.open_new(overwrite).write_config(prep.cfg.to_yaml())
    return fit_classifier(prep, run, progress=progress, deadline=deadline, callbacks=callbacks,
                          device=rank_device(device, dist), dist=dist)


def _resume(resume: Any, data: Any, labels: Any, samples: SampleTable | None, progress: bool,
            callbacks: tuple[cb.Callback, ...]) -> FinetuneResult:
    """Continue a run from its ``last.pt``: its own config and data, its trainer and callback states."""
    state = RunDirectory(resume).load_last()
    cfg = config_from_dict(state["config"])
    if samples is None and data is None:
        data, labels = state["data"], state["labels"]
    device = pick_device(cfg.train.device)
    dist = init_distributed(device)
    run = RunDirectory(resume, dist.main)
    prep = prepare(cfg, data, labels, samples)
    # the run's own time limit applies to what is left, from now
    deadline = time.perf_counter() + 60 * cfg.train.time_limit_minutes if cfg.train.time_limit_minutes > 0 else None
    return fit_classifier(prep, run, progress=progress, deadline=deadline, resume_state=state,
                          callbacks=callbacks, device=rank_device(device, dist), dist=dist)
