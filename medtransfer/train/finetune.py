"""The fine-tuning recipe, top to bottom.

1. samples table (demo / folder + CSV / MedMNIST .npz) → patient-grouped split
2. backbone + weights (load report) → new head
3. head-only epochs with the backbone frozen (BatchNorm in inference mode), optionally on features
   computed once (``train.feature_cache``)
4. unfreeze (all at once or gradually, by layer group; :mod:`medtransfer.transfer.plan`): the
   backbone groups train at ``lr × backbone_lr_mult`` (discriminative: ``× layer_lr_ratio`` for the
   first group), the head at ``lr``; cosine / one-cycle / ReduceLROnPlateau
5. model selection and early stopping on validation AUC; the best model is saved as a
   self-describing checkpoint (``model.pt``), the resumable state every epoch (``last.pt``)
6. validation and test metrics, predictions and plots in the run directory

One process, or one per device under ``torchrun`` (DDP: rank 0 writes, validation predictions are
gathered from every rank). On CUDA: AMP, channels-last, pinned memory.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import functools
import gc
import json
import logging
import math
import os
import platform
import random
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import medtransfer
from medtransfer.backbones import LoadReport, check_input_contract, get_weight_spec, load_backbone
from medtransfer.config import RunConfig, config_from_dict
from medtransfer.data.preprocess import Preprocessor, PreprocessSpec
from medtransfer.data.samples import (
    Sample,
    SampleTable,
    cap_val,
    check_leakage,
    split_by_patient,
    split_report,
    subsample_train,
)
from medtransfer.errors import ConfigError, DataError
from medtransfer.metrics._utils import nan_to_none, write_json_atomic
from medtransfer.train.augment import augment_batch
from medtransfer.transfer import (
    EnsembleModel,
    TaskLoss,
    TransferModel,
    apply_plan,
    class_weights,
    group_learning_rates,
    layer_groups,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medtransfer-run/1"
LAST_FORMAT = "medtransfer-last/1"


@dataclass
class FinetuneResult:
    """What a finished run produced (everything is also on disk in ``run_dir``)."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    load_report: LoadReport
    split_report: dict[str, Any] = field(default_factory=dict)


class ImageSet(Dataset):
    """Samples → ``([0, 1]`` tensor ``(C, S, S)``, label); decoded images are cached in memory."""

    def __init__(self, table: SampleTable, samples: list[Sample], pre: Preprocessor, cache: bool = True):
        self.table, self.samples, self.pre = table, samples, pre
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor:
        s = self.samples[i]
        if self.table.source == "npz":
            array = self.table.arrays[s.split][s.index]
            return self.pre.load_npz_volume(array) if self.pre.spec.dims == 3 else self.pre.load_npz(array)
        if self.pre.spec.dims == 3:
            return self.pre.load_volume(s.path)
        return self.pre.load_image(s.path)

    def label(self, i: int) -> int | torch.Tensor:
        y = self.samples[i].label
        return torch.tensor(y, dtype=torch.float32) if isinstance(y, tuple) else y

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        if self._cache is None:
            return self.load(i), self.label(i)
        if i not in self._cache:
            self._cache[i] = self.load(i)
        return self._cache[i], self.label(i)


def resolve_samples(data: str | os.PathLike[str] | None, labels: str | os.PathLike[str] | None,
                    classes: list[str] | None = None) -> SampleTable:
    """``None`` → the synthetic demo set; ``*.npz`` → MedMNIST; a folder → needs ``labels``.

    ``classes`` (``data.classes``) names the classes in index order: it orders named CSV labels and
    names numeric ones (CSV indices, a ``.npz`` file's classes)."""
    from medtransfer.data.samples import samples_from_folder, samples_from_npz

    if data is None:
        from medtransfer.data.demo import LABEL_NAMES, demo_dataset_dir

        root = demo_dataset_dir()
        table = samples_from_folder(root, root / "labels.csv")
        table.label_names = list(LABEL_NAMES)
        return table
    path = Path(data)
    if path.suffix == ".npz":
        table = samples_from_npz(path)
        if classes:
            if len(classes) != table.num_classes:
                raise DataError(f"{path.name} has {table.num_classes} classes but data.classes names "
                                f"{len(classes)}: {list(classes)}.")
            table.label_names = list(classes)
        return table
    if path.is_dir():
        if labels is None:
            raise DataError(f"--data {path} is a folder; also pass --labels CSV (columns: path,label[,patient_id]).")
        return samples_from_folder(path, labels, classes)
    raise DataError(f"--data '{path}' is neither a folder nor a .npz file.")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype_for(amp: str, device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``: None (fp32) on CPU or with 'off'; bf16 where the
    GPU supports it under 'auto' (no loss scaling needed), else fp16 (trained with a GradScaler)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def compute_info(device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, world: int) -> dict[str, Any]:
    """What the run computed on, for metrics.json: device, precision, memory format, pinned memory, ranks."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler"}
    return {"device": name, "precision": precision[amp_dtype], "channels_last": channels_last,
            "pinned_memory": device.type == "cuda", "world_size": world, "torch": torch.__version__}


def preprocess_spec(cfg: RunConfig, channels: int, mean: tuple[float, ...], std: tuple[float, ...],
                    dims: int = 2) -> PreprocessSpec:
    """The preprocessing of this run; the weights' per-channel mean/std are averaged when the input
    channels differ from the weights' (exact for mean = std = 0.5 with summed stem kernels)."""
    if len(mean) != channels:
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return PreprocessSpec(
        size=cfg.data.size, channels=channels, window=cfg.data.window,
        percentiles=tuple(cfg.data.percentiles), mean=tuple(mean), std=tuple(std), dims=dims,
    )


def _input_channels(table: SampleTable) -> int:
    """1 for grayscale, 3 for colour, D for ``(D, H, W)`` volumes (their slices become channels).
    A folder of colour PNG / JPEG images (dermoscopy, photographs) is colour when its first image is."""
    if table.source == "npz":
        first = next(iter(table.arrays.values()))
        if first.ndim == 4:
            return 3 if first.shape[-1] in (3, 4) and first.shape[1] not in (3, 4) else int(first.shape[1])
        return 1
    from medtransfer.io import is_raster_path, read_raster

    if table.samples and is_raster_path(table.samples[0].path):
        return 3 if read_raster(table.samples[0].path).array.ndim == 3 else 1
    return 1


def _loss_fn(model: TransferModel, train: list[Sample], weighting: bool, device: torch.device) -> nn.Module:
    weight = class_weights(model.task, [s.label for s in train], model.num_classes) if weighting else None
    return TaskLoss(model.task, model.num_classes, weight).to(device)


@torch.no_grad()
def predict_loader(
    model: TransferModel, loader: DataLoader, pre: Preprocessor | None, device: torch.device,
    forward: Any = None, autocast: Any = contextlib.nullcontext,
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
        prob, logit = _gather_shards(prob, len(loader.dataset)), _gather_shards(logit, len(loader.dataset))
    return prob, logit


def _gather_shards(part: np.ndarray, n: int) -> np.ndarray:
    """Undo :class:`DistributedSampler` (``shuffle=False``): rank ``r`` holds items ``r, r + W, …``."""
    import torch.distributed as tdist

    world = tdist.get_world_size()
    parts: list[Any] = [None] * world
    tdist.all_gather_object(parts, part)
    out = np.empty((len(parts[0]) * world, *part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out[:n]


def _task_of(model_or_task: Any, prob: np.ndarray) -> str:
    task = getattr(model_or_task, "task", model_or_task)
    if task in ("binary", "multiclass", "multilabel"):
        return task
    return "binary" if prob.shape[1] == 2 else "multiclass"


def _auc(y: np.ndarray, prob: np.ndarray, task: str | None = None) -> float:
    """Validation AUC for model selection (binary, or macro one-vs-rest); NaN when undefined."""
    from medtransfer.metrics import roc_auc

    return float(roc_auc(y, prob, task=_task_of(task, prob)))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: TransferModel, cfg: RunConfig, spec: PreprocessSpec,
                    label_names: list[str], extra: dict[str, Any] | None = None) -> None:
    """A self-describing checkpoint: weights + everything needed to rebuild and preprocess."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": model.state_dict(),
        "config": cfg.to_dict(),
        "preprocess": spec.to_dict(),
        "label_names": list(label_names),
        "num_classes": model.num_classes,
        "backbone": cfg.model.backbone,
        "versions": {
            "medtransfer": medtransfer.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        **(extra or {}),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def default_run_dir(modality: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{modality}"


@dataclass
class Distributed:
    """This process's place in a ``torchrun`` job (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _broadcast(obj: Any, dist: Distributed) -> Any:
    if dist.world == 1:
        return obj
    import torch.distributed as tdist

    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(), "torch": torch.get_rng_state(), "generator": gen.get_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_last_checkpoint(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The resumable state of a run directory (``last.pt``, written atomically every epoch)."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file() and (Path(run_dir) / "members").is_dir():
        raise DataError(f"Cannot resume '{run_dir}' as a whole: it is an ensemble (train.ensemble). Resume an "
                        f"unfinished member with --resume {Path(run_dir) / 'members' / '<i>'}.")
    if not path.is_file():
        raise DataError(f"Cannot resume '{run_dir}': it has no last.pt (written after each finished epoch). "
                        "Pass the --out folder of a run that finished at least one epoch.")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != LAST_FORMAT:
        raise DataError(f"{path} has format {ckpt.get('format')!r}; expected {LAST_FORMAT!r}.")
    return ckpt


def _lr_factor(kind: str, total: int) -> Any:
    """Per-step LR multiplier after the head-only epochs (``t`` = optimizer steps since unfreezing)."""
    def cosine(t: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(t, total) / max(total, 1)))

    def onecycle(t: int) -> float:  # linear warm-up from 1/25 over 30% of the steps, cosine down to 1e-4
        warm = max(int(0.3 * total), 1)
        if t < warm:
            return 1 / 25 + (1 - 1 / 25) * t / warm
        frac = min(t - warm, total - warm) / max(total - warm, 1)
        return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * frac))

    return {"cosine": cosine, "onecycle": onecycle}[kind]


def build_optimizer(model: TransferModel, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW with one param group per backbone layer group (input → output, discriminative LRs) and
    the head last. Frozen parameters stay in their group: with no gradient they are not stepped, so
    unfreezing and resuming never rebuild or reorder the groups."""
    groups = layer_groups(model.backbone)
    lrs = group_learning_rates(len(groups), cfg.train.lr * cfg.train.backbone_lr_mult, cfg.train.layer_lr_ratio)
    return torch.optim.AdamW(
        [{"params": g.params, "lr": lr, "name": g.name} for g, lr in zip(groups, lrs)]
        + [{"params": list(model.head.parameters()), "lr": cfg.train.lr, "name": "head"}],
        weight_decay=cfg.train.weight_decay,
    )


def finetune(
    cfg: RunConfig,
    data: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    resume: str | os.PathLike[str] | None = None,
    samples: SampleTable | None = None,
    deadline: float | None = None,
) -> FinetuneResult:
    """Run the whole recipe (see the module docstring) and write the run directory.

    ``resume``: a run directory whose ``last.pt`` is continued exactly (its config and data are
    used; ``cfg`` is ignored). ``samples``: a ready samples table (e.g. one cross-validation fold)
    instead of ``data``/``labels``. ``deadline``: a ``time.perf_counter()`` instant by which the run
    must be done (an ensemble passes its own to the members); otherwise ``train.time_limit_minutes``
    from now, if set.
    """
    t_start = time.perf_counter()
    cfg = copy.deepcopy(cfg)  # settings resolved from the data are recorded on this copy
    if deadline is None and cfg.train.time_limit_minutes > 0:
        deadline = t_start + 60 * cfg.train.time_limit_minutes
    if cfg.train.ensemble > 1 and resume is None:
        return _finetune_ensemble(cfg, data, labels, out_dir, progress, samples, deadline)
    ckpt = None
    if resume is not None:
        ckpt = load_last_checkpoint(resume)
        cfg = config_from_dict(ckpt["config"])
        out_dir = resume
        if samples is None and data is None:
            data, labels = ckpt["data"], ckpt["labels"]
    device = pick_device(cfg.train.device)
    dist = init_distributed(device)
    if dist.world > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    run_dir = Path(_broadcast(str(out_dir) if out_dir else str(default_run_dir(cfg.modality)), dist))
    main = dist.main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    gen = seed_everything(cfg.train.seed)

    table = samples if samples is not None else resolve_samples(data, labels, cfg.data.classes)
    if table.num_classes < 2:
        raise DataError("The labels hold a single class; fine-tuning needs at least two.")
    if cfg.model.task == "regression":
        raise ConfigError("model.task = regression needs real-valued labels; the samples table holds class "
                          "indices. Use auto, binary, multiclass, ordinal or multilabel.")
    if table.task == "multilabel" and cfg.model.task in ("auto", "multilabel"):
        cfg.model.task = "multilabel"  # resolved from the data; saved with the run
        if main:
            _atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    elif cfg.model.task == "multilabel":
        raise ConfigError("model.task = multilabel needs 0/1 label vectors (e.g. a .npz with (N, K) labels).")
    _split_and_subsample(table, cfg)
    splits = split_report(table)
    train_s, val_s, test_s = (table.subset(s) for s in ("train", "val", "test"))
    if not train_s or not val_s:
        raise DataError(f"Need training and validation samples; the split gave {splits}.")

    wspec = get_weight_spec(cfg.model.backbone)
    channels = _input_channels(table) if wspec.dims == 2 else 1  # a 3D backbone takes whole volumes
    backbone, report = load_backbone(wspec, channels, cfg.model.weights)
    model = TransferModel(backbone, table.num_classes, cfg.model.head, cfg.model.dropout, cfg.model.task).to(device)
    spec = preprocess_spec(cfg, channels, wspec.mean, wspec.std, wspec.dims)
    pre = Preprocessor(spec)
    if main:
        _atomic_write_text(run_dir / "split_report.json", json.dumps(splits, indent=2))
        _atomic_write_text(run_dir / "load_report.json", json.dumps(report.to_dict(), indent=2))

    # ---- CUDA-only speed paths (guarded by device type; CPU runs take none of them) ----
    cuda = device.type == "cuda"
    amp_dtype = amp_dtype_for(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    channels_last = cuda and cfg.train.channels_last and wspec.dims == 2
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    loader_kw = dict(batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, pin_memory=cuda)
    train_set = ImageSet(table, train_s, pre, cfg.data.cache)
    drop_last = len(train_s) > cfg.train.batch_size * dist.world
    sampler = DistributedSampler(train_set, seed=cfg.train.seed, drop_last=drop_last) if dist.world > 1 else None
    train_loader = DataLoader(train_set, shuffle=sampler is None, sampler=sampler, generator=gen,
                              drop_last=drop_last, **loader_kw)
    eval_loaders = {}
    for name, ss in (("val", val_s), ("test", test_s)):
        if ss:
            ds = ImageSet(table, ss, pre, cfg.data.cache)
            es = DistributedSampler(ds, shuffle=False) if dist.world > 1 else None
            eval_loaders[name] = DataLoader(ds, shuffle=False, sampler=es, **loader_kw)
    y_val = torch.tensor(np.array([s.label for s in val_s], dtype=np.float32 if table.task == "multilabel" else np.int64),
                         device=device)
    loss_fn = _loss_fn(model, train_s, cfg.train.class_weighting, device)
    # A real batch against the weights' input contract (channels, dims, value range) before any work.
    first = torch.stack([train_set[i][0] for i in range(min(len(train_set), cfg.train.batch_size))])
    check_input_contract(pre.normalize(first), wspec, channels=channels, dims=wspec.dims)

    # ---- transfer plan: one optimizer param group per backbone layer group, the head last ----
    bn_policy = cfg.train.bn_policy
    if bn_policy == "auto":
        bn_policy = "train" if cfg.model.weights == "none" else "frozen"
    opt = build_optimizer(model, cfg)
    accum = cfg.train.grad_accum
    steps_per_epoch = math.ceil(len(train_loader) / accum)
    total_epochs = cfg.train.head_epochs + cfg.train.finetune_epochs
    sched = plateau = None  # the per-step schedule starts when the head-only epochs end
    if cfg.train.lr_schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min" if cfg.train.plateau_monitor == "val_loss" else "max",
            factor=cfg.train.plateau_factor, patience=cfg.train.plateau_patience, min_lr=cfg.train.min_lr)

    def unfrozen_at(epoch: int) -> int | None:
        """Layer groups (from the top) that may train in ``epoch``; None: all the freeze mode allows."""
        if epoch <= cfg.train.head_epochs:
            return 0
        if cfg.train.schedule == "gradual":
            return 1 + (epoch - cfg.train.head_epochs - 1) // cfg.train.unfreeze_every
        return None

    use_cache = (cfg.train.feature_cache == "on"
                 or (cfg.train.feature_cache == "auto" and not cfg.train.head_augment))
    if use_cache and dist.world > 1:
        logger.info("feature cache off under DDP (each rank would cache a different shard)")
        use_cache = False
    feature_loaders: dict[str, DataLoader] | None = None

    history: list[dict[str, Any]] = []
    time_limited = False
    val_pass_s = None  # seconds of the last full (uncached) validation pass, to budget the final evaluation
    best = {"auc": -math.inf, "loss": math.inf, "state": _snapshot(model), "epoch": 0}
    start_epoch, stale = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if plateau is not None:
            plateau.load_state_dict(ckpt["plateau"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], gen)
        history, best, start_epoch, stale = list(ckpt["history"]), dict(ckpt["best"]), ckpt["epoch"], ckpt["stale"]
        logger.info("resuming %s after epoch %d", run_dir, start_epoch)

    writer = None
    if cfg.train.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            warnings.warn("train.tensorboard is on but tensorboard is not installed (pip install tensorboard); "
                          "logging to history.csv only.", stacklevel=2)

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not (progress and main),
                   transient=False)
    stage: Any = "unset"
    net: nn.Module = model
    with bar, _frozen_heap():
        task = bar.add_task("fine-tuning", total=total_epochs * len(train_loader),
                            completed=start_epoch * len(train_loader), status="")
        for epoch in range(start_epoch + 1, total_epochs + 1):
            phase = "head" if epoch <= cfg.train.head_epochs else "finetune"
            if unfrozen_at(epoch) != stage:
                stage = unfrozen_at(epoch)
                apply_plan(model, "backbone" if stage == 0 else cfg.train.freeze, bn_policy,
                           cfg.train.trainable_stages, cfg.train.freeze_pattern, stage)
                if dist.world > 1:  # DDP hooks only the parameters that train when it wraps the model
                    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
            if phase == "finetune" and sched is None and cfg.train.lr_schedule in ("cosine", "onecycle"):
                factor = _lr_factor(cfg.train.lr_schedule, cfg.train.finetune_epochs * steps_per_epoch)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
                if ckpt is not None and ckpt["scheduler"] is not None:
                    sched.load_state_dict(ckpt["scheduler"])
                    for group, saved in zip(opt.param_groups, ckpt["optimizer"]["param_groups"]):
                        group["lr"] = saved["lr"]  # LambdaLR's constructor reset them to factor(0)
            cached = phase == "head" and use_cache
            if cached and feature_loaders is None:
                feature_loaders = _feature_loaders(model, train_set, eval_loaders["val"], pre, device, autocast,
                                                   gen, drop_last, loader_kw)
            batches = feature_loaders["train"] if cached else train_loader
            augment = phase == "finetune" or cfg.train.head_augment
            if sampler is not None:
                sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            model.train()
            losses = []
            opt.zero_grad(set_to_none=True)
            for i, (x, y) in enumerate(batches):
                x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
                if not cached:
                    x = pre.normalize(augment_batch(x, cfg.augment, gen) if augment else x)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                step_now = (i + 1) % accum == 0 or i + 1 == len(batches)
                no_sync = net.no_sync() if dist.world > 1 and not step_now else contextlib.nullcontext()
                with no_sync:
                    with autocast():
                        loss = loss_fn(model.head(x) if cached else net(x), y)
                    scaler.scale(loss / accum).backward()
                if step_now:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad(set_to_none=True)
                    if sched is not None:
                        sched.step()
                losses.append(loss.item())
                bar.update(task, advance=1, status=f"{phase} epoch {epoch} loss {losses[-1]:.3f}")
            if cached:
                prob_val, logit_val = predict_loader(model, feature_loaders["val"], None, device, model.head, autocast)
            else:
                t_val = time.perf_counter()
                prob_val, logit_val = predict_loader(model, eval_loaders["val"], pre, device, None, autocast)
                val_pass_s = time.perf_counter() - t_val
            with torch.no_grad():
                val_loss = float(loss_fn(torch.from_numpy(logit_val).to(device), y_val))
            val_auc = _auc(y_val.cpu().numpy(), prob_val, model.task)
            if plateau is not None and phase == "finetune":
                plateau.step(val_loss if cfg.train.plateau_monitor == "val_loss" else val_auc)
            row = {
                "epoch": epoch, "phase": phase, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
                "val_auc": val_auc, "lr": opt.param_groups[-1]["lr"], "seconds": time.perf_counter() - t0,
            }
            history.append(row)
            logger.info("epoch %d (%s): train loss %.4f, val loss %.4f, val AUC %.4f", epoch, phase,
                        row["train_loss"], val_loss, val_auc)
            bar.update(task, status=f"{phase} epoch {epoch} val AUC {val_auc:.3f}")
            better = (val_auc > best["auc"]) or (
                (math.isnan(val_auc) or val_auc == best["auc"]) and val_loss < best["loss"]
            )
            stale = 0 if better else stale + 1
            if better:
                best.update(auc=val_auc if not math.isnan(val_auc) else best["auc"], loss=val_loss,
                            state=_snapshot(model), epoch=epoch)
                if main:
                    save_checkpoint(run_dir / "model.pt", model, cfg, spec, table.label_names,
                                    {"epoch": epoch, "load_report": report.to_dict()})
            if main:
                _write_history(run_dir / "history.csv", history)
                if writer is not None:
                    for key in ("train_loss", "val_loss", "val_auc", "lr"):
                        writer.add_scalar(key, row[key], epoch)
                _atomic_save({
                    "format": LAST_FORMAT, "epoch": epoch, "stale": stale, "history": history, "best": best,
                    "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "plateau": plateau.state_dict() if plateau is not None else None,
                    "scaler": scaler.state_dict(), "rng": _rng_state(gen), "config": cfg.to_dict(),
                    "unfrozen": -1 if stage is None else stage,
                    "data": None if data is None else str(data), "labels": None if labels is None else str(labels),
                }, run_dir / "last.pt")
            if cfg.train.patience and stale >= cfg.train.patience and phase == "finetune":
                logger.info("early stopping after %d epochs without a better validation AUC", stale)
                break
            if deadline is not None and epoch < total_epochs and val_pass_s is not None:
                # Another epoch like this one, then the final val + test pass and the report.
                final_s = val_pass_s * (len(val_s) + len(test_s)) / len(val_s) + _REPORT_SECONDS
                if time.perf_counter() + row["seconds"] + final_s > deadline:
                    time_limited = True
                    logger.warning("time limit: stopping after epoch %d of %d (train.time_limit_minutes); the best "
                                   "epoch on validation so far is kept", epoch, total_epochs)
                    break
    if writer is not None:
        writer.close()

    model.load_state_dict(best["state"])
    results = {}
    t_eval = time.perf_counter()
    for name, loader in eval_loaders.items():
        ss = loader.dataset.samples
        prob, _ = predict_loader(model, loader, pre, device, None, autocast)
        results[name] = {
            "y": np.array([s.label for s in ss]), "prob": prob,
            "patient_ids": [s.patient_id for s in ss], "paths": [s.path for s in ss],
        }
    eval_s = time.perf_counter() - t_eval
    if not main:
        return FinetuneResult(run_dir, {}, history, report, splits)
    info = _model_info(cfg, data, samples, table, splits, spec, wspec, report, best["epoch"], dist.world)
    metrics = write_evaluation(run_dir, results, table.label_names, history, info, cfg.model.task == "ordinal")
    # The operating point chosen on validation travels with the model, so predict applies it unchanged.
    model.cpu()
    save_checkpoint(run_dir / "model.pt", model, cfg, spec, table.label_names,
                    {"epoch": best["epoch"], "load_report": report.to_dict(),
                     "operating_point": nan_to_none(metrics.get("operating_point"))})
    metrics["best_epoch"] = best["epoch"]
    metrics["minutes"] = (time.perf_counter() - t_start) / 60
    metrics["eval_seconds"] = eval_s
    metrics["compute"] = compute_info(device, amp_dtype, channels_last, dist.world)
    metrics["split"] = splits
    if deadline is not None:
        metrics["time_limit"] = {"epochs_run": len(history), "epochs_planned": total_epochs, "stopped": time_limited}
    write_json_atomic(run_dir / "metrics.json", metrics)
    return FinetuneResult(run_dir, metrics, history, report, splits)


_REPORT_SECONDS = 15.0
"""Reserved under a time limit for writing the report (bootstrap CIs, plots) after the final pass."""


def _split_and_subsample(table: SampleTable, cfg: RunConfig) -> None:
    """Patient-grouped split where the table has none (``train.seed``), the leakage check (also for
    user-supplied splits), then the stratified ``data.train_fraction`` of the training patients and
    at most ``data.val_max`` validation images."""
    if any(s.split is None for s in table.samples):
        split_by_patient(table, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed)
    check_leakage(table.samples)
    subsample_train(table, cfg.data.train_fraction, cfg.train.seed)
    n_val = len(table.subset("val"))
    kept = len(cap_val(table, cfg.data.val_max, cfg.train.seed).subset("val"))
    if kept < n_val:
        logger.info("model selection on %d of %d validation images (data.val_max=%d)", kept, n_val, cfg.data.val_max)


def _finetune_ensemble(cfg: RunConfig, data: Any, labels: Any, out_dir: Any, progress: bool,
                       samples: SampleTable | None, deadline: float | None) -> FinetuneResult:
    """``train.ensemble = K``: K complete runs (seeds ``seed … seed+K-1``) on one split and one
    training subset, each in ``RUN_DIR/members/<i>`` with its own report; the run directory holds
    the ensemble (mean of the members' probabilities), evaluated and reported like a single model.
    Under a ``deadline`` a member starts only if one more member and the ensemble's evaluation
    (every member over val + test) fit, judged on the members trained so far."""
    from medtransfer.inference.predict import load_run

    t_start = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.ensemble > 1 does not run under torchrun; train the members as separate "
                          "runs (train.seed=…) or set train.ensemble=1.")
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg.modality)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    table = samples if samples is not None else resolve_samples(data, labels, cfg.data.classes)
    if table.num_classes < 2:
        raise DataError("The labels hold a single class; fine-tuning needs at least two.")
    _split_and_subsample(table, cfg)  # once, so every member trains on the same split and subset
    member_runs, history = [], []
    for i in range(cfg.train.ensemble):
        member_deadline = deadline
        if deadline is not None and member_runs:
            member_s = max(r.metrics["minutes"] * 60 for r in member_runs)
            eval_s = max(r.metrics["eval_seconds"] for r in member_runs)
            # The ensemble's own val + test pass runs every member: (i + 1) member evaluations.
            member_deadline = deadline - (i + 1) * eval_s - _REPORT_SECONDS
            if time.perf_counter() + member_s > member_deadline:
                logger.warning("time limit: the ensemble stops at %d of %d members (train.time_limit_minutes)",
                               i, cfg.train.ensemble)
                break
        mcfg = copy.deepcopy(cfg)
        mcfg.train.ensemble, mcfg.train.seed = 1, cfg.train.seed + i
        mcfg.data.train_fraction, mcfg.data.val_max = 1.0, 0  # the table is already subsampled
        logger.info("ensemble member %d/%d (seed %d)", i + 1, cfg.train.ensemble, mcfg.train.seed)
        res = finetune(mcfg, data=data, labels=labels, out_dir=run_dir / "members" / str(i), progress=progress,
                       samples=table, deadline=member_deadline)
        member_runs.append(res)
        history += [{"member": i, **row} for row in res.history]
    loaded = [load_run(r.run_dir, cfg.train.device) for r in member_runs]
    cfg.model.task = loaded[0].config.model.task  # as resolved from the data by the members
    _atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    model = EnsembleModel([r.model for r in loaded])  # members come back in eval mode
    pre, device = loaded[0].pre, loaded[0].device
    results = {}
    for name in ("val", "test"):
        ss = table.subset(name)
        if not ss:
            continue
        loader = DataLoader(ImageSet(table, ss, pre, cache=False), batch_size=cfg.train.batch_size, shuffle=False,
                            num_workers=cfg.data.num_workers)
        prob, _ = predict_loader(model, loader, pre, device)
        results[name] = {"y": np.array([s.label for s in ss]), "prob": prob,
                         "patient_ids": [s.patient_id for s in ss], "paths": [s.path for s in ss]}
    _write_history(run_dir / "history.csv", history)
    splits = member_runs[0].split_report
    report = member_runs[0].load_report
    info = _model_info(cfg, data, samples, table, splits, pre.spec, get_weight_spec(cfg.model.backbone), report,
                       None, 1)
    metrics = write_evaluation(run_dir, results, table.label_names, None, info, cfg.model.task == "ordinal")
    model.cpu()
    save_checkpoint(run_dir / "model.pt", model, cfg, pre.spec, table.label_names,
                    {"epoch": None, "load_report": report.to_dict(),
                     "operating_point": nan_to_none(metrics.get("operating_point"))})
    metrics["members"] = [
        {"seed": cfg.train.seed + i, "best_epoch": r.metrics.get("best_epoch"),
         "val_auc": r.metrics["val"].get("auc"), "test_auc": (r.metrics.get("test") or {}).get("auc"),
         "run_dir": str(r.run_dir)}
        for i, r in enumerate(member_runs)
    ]
    metrics["best_epoch"] = None
    metrics["compute"] = member_runs[0].metrics.get("compute")
    if deadline is not None:
        metrics["time_limit"] = {"members_trained": len(member_runs), "members_planned": cfg.train.ensemble,
                                 "stopped": len(member_runs) < cfg.train.ensemble
                                 or any(r.metrics["time_limit"]["stopped"] for r in member_runs)}
    metrics["minutes"] = (time.perf_counter() - t_start) / 60
    metrics["split"] = splits
    write_json_atomic(run_dir / "metrics.json", metrics)
    return FinetuneResult(run_dir, metrics, history, report, splits)


def _model_info(cfg: RunConfig, data: Any, samples: SampleTable | None, table: SampleTable,
                splits: dict[str, Any], spec: PreprocessSpec, wspec: Any, report: LoadReport,
                best_epoch: int | None, world: int) -> dict[str, Any]:
    """The model card's description of a run (data, preprocessing, weights, training)."""
    return {
        "model_name": f"{cfg.model.backbone} fine-tuned ({cfg.modality})"
        + (f", ensemble of {cfg.train.ensemble}" if cfg.train.ensemble > 1 else ""),
        "modality": cfg.modality,
        "created": datetime.now().isoformat(timespec="seconds"),
        "medtransfer_version": medtransfer.__version__,
        "label_names": table.label_names,
        "data": {
            "source": "built-in SYNTHETIC demo data (not patient data)" if data is None and samples is None
            else str(data),
            "splits": {k: {"n_patients": v["patients"], "n_images": v["images"]} for k, v in splits.items()},
        },
        "preprocessing": spec.to_dict(),
        "weights": {"architecture": wspec.architecture, "name": report.weights, "source": report.source,
                    "licence": wspec.license if cfg.model.weights == "pretrained" else "n/a",
                    "sha256": report.sha256},
        "training": {"head_epochs": cfg.train.head_epochs, "finetune_epochs": cfg.train.finetune_epochs,
                     "best_epoch": best_epoch, "lr": cfg.train.lr,
                     "backbone_lr_mult": cfg.train.backbone_lr_mult, "bn_policy": cfg.train.bn_policy,
                     "freeze": cfg.train.freeze, "schedule": cfg.train.schedule,
                     "lr_schedule": cfg.train.lr_schedule, "world_size": world,
                     "ensemble": cfg.train.ensemble},
    }


@torch.no_grad()
def _feature_loaders(model: TransferModel, train_set: ImageSet, val_loader: DataLoader, pre: Preprocessor,
                     device: torch.device, autocast: Any, gen: torch.Generator, drop_last: bool,
                     loader_kw: dict[str, Any]) -> dict[str, DataLoader]:
    """Pooled features of the frozen backbone (inference mode), computed once, as loaders for the head."""
    model.eval()

    def features(loader: DataLoader) -> TensorDataset:
        xs, ys = [], []
        for x, y in loader:
            with autocast():
                xs.append(model.backbone(pre.normalize(x.to(device))).float())
            ys.append(y.to(device))
        return TensorDataset(torch.cat(xs), torch.cat(ys))

    kw = dict(batch_size=loader_kw["batch_size"])
    ordered = DataLoader(train_set, shuffle=False, **loader_kw)
    return {
        "train": DataLoader(features(ordered), shuffle=True, generator=gen, drop_last=drop_last, **kw),
        "val": DataLoader(features(val_loader), shuffle=False, **kw),
    }


@contextlib.contextmanager
def _frozen_heap() -> Any:
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


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the weights (``copy.deepcopy`` of a state dict costs ~10x more on small models)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _atomic_save(payload: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def write_evaluation(run_dir: Path, results: dict[str, dict[str, Any]], label_names: list[str],
                     history: list[dict[str, Any]], info: dict[str, Any] | None = None,
                     ordinal: bool = False) -> dict[str, Any]:
    """Metrics with patient-level CIs, the operating point chosen on validation and applied to test,
    per-image predictions, plots and the model card (see :mod:`medtransfer.metrics.report`)."""
    from medtransfer.metrics import write_classification_report

    task = "multilabel" if any(np.ndim(r["y"]) == 2 for r in results.values()) else (
        "binary" if len(label_names) == 2 else "multiclass")
    return write_classification_report(
        run_dir, val=results["val"], test=results.get("test"), label_names=label_names, task=task,
        history=history, extra_info=info, ordinal=ordinal and task == "multiclass",
    )
