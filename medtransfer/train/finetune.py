"""The fine-tuning recipe, top to bottom.

1. samples table (demo / folder + CSV / MedMNIST .npz) → patient-grouped split
2. backbone + weights (load report) → new head
3. head-only epochs with the backbone frozen (BatchNorm in inference mode)
4. unfreeze: the backbone trains at ``lr × backbone_lr_mult``, the head at ``lr``, cosine decay
5. model selection on validation AUC; the best model is saved as a self-describing checkpoint
6. validation and test metrics, predictions and plots in the run directory
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import medtransfer
from medtransfer.backbones import LoadReport, get_weight_spec, load_backbone
from medtransfer.config import RunConfig
from medtransfer.data.preprocess import Preprocessor, PreprocessSpec
from medtransfer.data.samples import Sample, SampleTable, split_by_patient, split_report
from medtransfer.errors import DataError
from medtransfer.train.augment import augment_batch
from medtransfer.transfer import TransferModel, set_backbone_trainable

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "medtransfer-run/1"


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
            return self.pre.load_npz(self.table.arrays[s.split][s.index])
        return self.pre.load_dicom(s.path)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self._cache is None:
            return self.load(i), self.samples[i].label
        if i not in self._cache:
            self._cache[i] = self.load(i)
        return self._cache[i], self.samples[i].label


def resolve_samples(data: str | os.PathLike[str] | None, labels: str | os.PathLike[str] | None) -> SampleTable:
    """``None`` → the synthetic demo set; ``*.npz`` → MedMNIST; a folder → needs ``labels``."""
    from medtransfer.data.samples import samples_from_folder, samples_from_npz

    if data is None:
        from medtransfer.data.demo import LABEL_NAMES, demo_dataset_dir

        root = demo_dataset_dir()
        table = samples_from_folder(root, root / "labels.csv")
        table.label_names = list(LABEL_NAMES)
        return table
    path = Path(data)
    if path.suffix == ".npz":
        return samples_from_npz(path)
    if path.is_dir():
        if labels is None:
            raise DataError(f"--data {path} is a folder; also pass --labels CSV (columns: path,label[,patient_id]).")
        return samples_from_folder(path, labels)
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


def preprocess_spec(cfg: RunConfig, channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> PreprocessSpec:
    """The preprocessing of this run; the weights' per-channel mean/std are averaged when the input
    channels differ from the weights' (exact for mean = std = 0.5 with summed stem kernels)."""
    if len(mean) != channels:
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return PreprocessSpec(
        size=cfg.data.size, channels=channels, window=cfg.data.window,
        percentiles=tuple(cfg.data.percentiles), mean=tuple(mean), std=tuple(std),
    )


def _input_channels(table: SampleTable) -> int:
    if table.source == "npz":
        first = next(iter(table.arrays.values()))
        return 3 if first.ndim == 4 and first.shape[-1] == 3 else 1
    return 1


def _loss_fn(model: TransferModel, train: list[Sample], weighting: bool, device: torch.device) -> nn.Module:
    counts = np.bincount([s.label for s in train], minlength=model.num_classes).astype(np.float64)
    if model.num_classes == 2:
        pos_weight = counts[0] / max(counts[1], 1.0) if weighting else 1.0
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], dtype=torch.float32, device=device))
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1.0)) if weighting else np.ones_like(counts)
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))


def _targets(model: TransferModel, y: torch.Tensor) -> torch.Tensor:
    return y.float().view(-1, 1) if model.num_classes == 2 else y.long()


@torch.no_grad()
def predict_loader(
    model: TransferModel, loader: DataLoader, pre: Preprocessor, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities ``(N, C)`` and logits for every sample of ``loader``, in order."""
    model.eval()
    probs, logits = [], []
    for x, _ in loader:
        out = model(pre.normalize(x.to(device)))
        logits.append(out.float().cpu())
        probs.append(model.probabilities(out).cpu())
    return torch.cat(probs).numpy(), torch.cat(logits).numpy()


def _auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Validation AUC for model selection (binary, or macro one-vs-rest); NaN when undefined."""
    from medtransfer.metrics import roc_auc

    return float(roc_auc(y, prob, task="binary" if prob.shape[1] == 2 else "multiclass"))


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


def finetune(
    cfg: RunConfig,
    data: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Run the whole recipe (see the module docstring) and write the run directory."""
    t_start = time.perf_counter()
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg.modality)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    gen = seed_everything(cfg.train.seed)
    device = pick_device(cfg.train.device)

    table = resolve_samples(data, labels)
    if table.num_classes < 2:
        raise DataError("The labels hold a single class; fine-tuning needs at least two.")
    if any(s.split is None for s in table.samples):
        split_by_patient(table, cfg.data.val_fraction, cfg.data.test_fraction, cfg.train.seed)
    splits = split_report(table)
    _atomic_write_text(run_dir / "split_report.json", json.dumps(splits, indent=2))
    train_s, val_s, test_s = (table.subset(s) for s in ("train", "val", "test"))
    if not train_s or not val_s:
        raise DataError(f"Need training and validation samples; the split gave {splits}.")

    wspec = get_weight_spec(cfg.model.backbone)
    channels = _input_channels(table)
    backbone, report = load_backbone(wspec, channels, cfg.model.weights)
    _atomic_write_text(run_dir / "load_report.json", json.dumps(report.to_dict(), indent=2))
    model = TransferModel(backbone, table.num_classes, cfg.model.head, cfg.model.dropout).to(device)
    spec = preprocess_spec(cfg, channels, wspec.mean, wspec.std)
    pre = Preprocessor(spec)

    pin = device.type == "cuda"
    loader_kw = dict(batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, pin_memory=pin)
    train_set = ImageSet(table, train_s, pre, cfg.data.cache)
    train_loader = DataLoader(train_set, shuffle=True, generator=gen, drop_last=len(train_s) > cfg.train.batch_size, **loader_kw)
    eval_loaders = {
        name: DataLoader(ImageSet(table, ss, pre, cfg.data.cache), shuffle=False, **loader_kw)
        for name, ss in (("val", val_s), ("test", test_s)) if ss
    }
    y_val = np.array([s.label for s in val_s])
    loss_fn = _loss_fn(model, train_s, cfg.train.class_weighting, device)

    phases = [("head", cfg.train.head_epochs), ("finetune", cfg.train.finetune_epochs)]
    history: list[dict[str, Any]] = []
    best = {"auc": -math.inf, "loss": math.inf, "state": copy.deepcopy(model.state_dict()), "epoch": 0}
    total_steps = sum(n for _, n in phases) * len(train_loader)

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn(), TextColumn("{task.fields[status]}"), disable=not progress, transient=False)
    epoch = 0
    stale = 0
    with bar:
        task = bar.add_task("fine-tuning", total=total_steps, status="")
        for phase, n_epochs in phases:
            if n_epochs == 0:
                continue
            if phase == "head":
                set_backbone_trainable(model, False)
                groups = [{"params": list(model.head.parameters()), "lr": cfg.train.lr, "name": "head"}]
            else:
                bn_policy = cfg.train.bn_policy
                if bn_policy == "auto":
                    bn_policy = "train" if cfg.model.weights == "none" else "frozen"
                set_backbone_trainable(model, True, bn_policy)
                groups = [
                    {"params": [p for p in model.backbone.parameters() if p.requires_grad],
                     "lr": cfg.train.lr * cfg.train.backbone_lr_mult, "name": "backbone"},
                    {"params": list(model.head.parameters()), "lr": cfg.train.lr, "name": "head"},
                ]
            opt = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs * len(train_loader)) if phase == "finetune" else None
            for _ in range(n_epochs):
                epoch += 1
                t0 = time.perf_counter()
                model.train()
                losses = []
                for x, y in train_loader:
                    x = x.to(device, non_blocking=pin)
                    x = pre.normalize(augment_batch(x, cfg.augment, gen))
                    loss = loss_fn(model(x), _targets(model, y.to(device)))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if sched is not None:
                        sched.step()
                    losses.append(loss.item())
                    bar.update(task, advance=1, status=f"{phase} epoch {epoch} loss {loss.item():.3f}")
                prob_val, logit_val = predict_loader(model, eval_loaders["val"], pre, device)
                with torch.no_grad():
                    val_loss = float(loss_fn(torch.from_numpy(logit_val).to(device),
                                             _targets(model, torch.from_numpy(y_val).to(device))))
                val_auc = _auc(y_val, prob_val)
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
                if better:
                    best.update(auc=val_auc if not math.isnan(val_auc) else best["auc"], loss=val_loss,
                                state=copy.deepcopy(model.state_dict()), epoch=epoch)
                    save_checkpoint(run_dir / "model.pt", model, cfg, spec, table.label_names,
                                    {"epoch": epoch, "load_report": report.to_dict()})
                    stale = 0
                else:
                    stale += 1
                _write_history(run_dir / "history.csv", history)
                if cfg.train.patience and stale >= cfg.train.patience and phase == "finetune":
                    logger.info("early stopping after %d epochs without a better validation AUC", stale)
                    break

    model.load_state_dict(best["state"])
    if not (run_dir / "model.pt").exists():
        save_checkpoint(run_dir / "model.pt", model, cfg, spec, table.label_names,
                        {"epoch": best["epoch"], "load_report": report.to_dict()})
    results = {}
    for name, loader in eval_loaders.items():
        ss = loader.dataset.samples
        prob, _ = predict_loader(model, loader, pre, device)
        results[name] = {
            "y": np.array([s.label for s in ss]), "prob": prob,
            "patient_ids": [s.patient_id for s in ss], "paths": [s.path for s in ss],
        }
    info = {
        "model_name": f"{cfg.model.backbone} fine-tuned ({cfg.modality})",
        "modality": cfg.modality,
        "created": datetime.now().isoformat(timespec="seconds"),
        "medtransfer_version": medtransfer.__version__,
        "label_names": table.label_names,
        "data": {
            "source": "built-in SYNTHETIC demo data (not patient data)" if data is None else str(data),
            "splits": {k: {"n_patients": v["patients"], "n_images": v["images"]} for k, v in splits.items()},
        },
        "preprocessing": spec.to_dict(),
        "weights": {"architecture": wspec.architecture, "name": report.weights, "source": report.source,
                    "licence": wspec.license if cfg.model.weights == "pretrained" else "n/a",
                    "sha256": report.sha256},
        "training": {"head_epochs": cfg.train.head_epochs, "finetune_epochs": cfg.train.finetune_epochs,
                     "best_epoch": best["epoch"], "lr": cfg.train.lr,
                     "backbone_lr_mult": cfg.train.backbone_lr_mult, "bn_policy": cfg.train.bn_policy},
    }
    metrics = write_evaluation(run_dir, results, table.label_names, history, info)
    # The operating point chosen on validation travels with the model, so predict applies it unchanged.
    model.cpu()
    save_checkpoint(run_dir / "model.pt", model, cfg, spec, table.label_names,
                    {"epoch": best["epoch"], "load_report": report.to_dict(),
                     "operating_point": _plain(metrics.get("operating_point"))})
    metrics["best_epoch"] = best["epoch"]
    metrics["minutes"] = (time.perf_counter() - t_start) / 60
    metrics["split"] = splits
    _atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=_json_default))
    return FinetuneResult(run_dir, metrics, history, report, splits)


def _plain(obj: Any) -> Any:
    """JSON round trip: only plain containers and numbers (safe for ``weights_only`` loading)."""
    return json.loads(json.dumps(obj, default=_json_default)) if obj is not None else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, path)


def write_evaluation(run_dir: Path, results: dict[str, dict[str, Any]], label_names: list[str],
                     history: list[dict[str, Any]], info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics with patient-level CIs, the operating point chosen on validation and applied to test,
    per-image predictions, plots and the model card (see :mod:`medtransfer.metrics.report`)."""
    from medtransfer.metrics import write_classification_report

    task = "binary" if len(label_names) == 2 else "multiclass"
    return write_classification_report(
        run_dir, val=results["val"], test=results.get("test"), label_names=label_names, task=task,
        history=history, extra_info=info,
    )
