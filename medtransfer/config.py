"""Typed run configuration: a modality preset, then a user YAML, then dotted overrides.

Resolution order (later wins)::

    configs/<modality>.yaml  →  --config FILE  →  --set section.key=value (repeatable)

Every key and value is validated before any work starts; an unknown key or a bad value raises
:class:`~medtransfer.errors.ConfigError` with a "did you mean" hint.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medtransfer._suggest import did_you_mean
from medtransfer.errors import ConfigError
from medtransfer.options import (
    AMP,
    AdaptationMode,
    BNPolicy,
    FreezeMode,
    Head,
    HeadSolver,
    LRSchedule,
    OutsidePaths,
    PlateauMonitor,
    SelectionProtocol,
    SlicePooling,
    StrEnum,
    Switch,
    Task,
    UnfreezeSchedule,
    VolumeEncoder,
    Window,
)


def _choices(options: type[StrEnum]) -> dict[str, Any]:
    return {"choices": options.values()}


@dataclass
class DataConfig:
    """Where the samples come from and how they become tensors."""

    size: int = field(default=128, metadata={"min": 8})
    """Images are padded to square and resized to size × size pixels."""
    window: str = field(default="tags", metadata=_choices(Window))
    """Intensity window: the DICOM VOI tags (falling back to percentiles), percentiles, or none."""
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    val_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 0.9})
    test_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 0.9})
    cache: bool = True
    """Keep decoded, resized images in memory (small datasets)."""
    num_workers: int = field(default=0, metadata={"min": 0})
    train_fraction: float = field(default=1.0, metadata={"min": 0.001, "max": 1.0})
    """Train on this fraction of the training patients (stratified, seeded); validation and test
    stay whole. For sample-efficiency studies and for fitting large sets into a time budget."""
    classes: list[str] = field(default_factory=list)
    """Class names in index order, e.g. [normal, pneumonia]: for a binary task the second is the positive
    class (sensitivity, PPV). Orders named CSV labels and names numeric ones (indices, .npz). Empty:
    names meaning 'nothing found' (normal, negative, benign, healthy, no_finding, …) first, the rest sorted."""
    outside_paths: str = field(default="warn", metadata=_choices(OutsidePaths))
    """Files of the labels CSV outside --data (``../..``, absolute paths elsewhere): 'warn', or 'forbid'
    them (shared servers)."""
    skip_bad_images: bool = False
    """Leave out images that cannot be read or hold NaN / infinite values, each named in the log and in
    metrics.json (default: stop at the first one, naming the file and its patient)."""
    val_max: int = field(default=0, metadata={"min": 0})
    """Select the model on at most this many validation images (whole patients, stratified, seeded;
    0: all). A validation pass runs every epoch; on large sets a few thousand images rank epochs
    as well as all of them. The test split always stays whole."""


@dataclass
class AugmentConfig:
    """Training-time augmentation; defaults are safe for the modality (no L/R flip for chest X-ray)."""

    hflip: bool = False
    rotate_degrees: float = field(default=5.0, metadata={"min": 0.0, "max": 180.0})
    scale: float = field(default=0.05, metadata={"min": 0.0, "max": 0.5})
    brightness: float = field(default=0.05, metadata={"min": 0.0, "max": 1.0})
    contrast: float = field(default=0.05, metadata={"min": 0.0, "max": 1.0})
    rotate_3d: bool = False
    """Volumes: rotate by up to ``rotate_degrees`` about each of the three axes (for near-isotropic
    volumes) instead of about the slice axis only (the default, right for thick-slice data)."""

    @property
    def is_identity(self) -> bool:
        """No transform at all: every magnitude 0 and no flip."""
        return not (self.hflip or self.rotate_degrees or self.scale or self.brightness or self.contrast)


@dataclass
class ModelConfig:
    """Backbone, its weights and the new head."""

    backbone: str = "efficientnet_lite0.in1k"
    weights: str = "pretrained"
    """'pretrained' (the registry's weights), 'none' (random initialisation) or a file path."""
    head: str = field(default="linear", metadata=_choices(Head))
    """'linear': Dropout + Linear; 'mlp': Linear(128) + ReLU + Dropout(0.5) + Linear."""
    dropout: float = field(default=0.2, metadata={"min": 0.0, "max": 0.95})
    task: str = field(default="auto", metadata=_choices(Task))
    """'auto': binary for two classes (sigmoid), multiclass otherwise (softmax); 'ordinal': K-1
    cumulative logits for ordered grades (see medtransfer.transfer.model)."""
    stages: int = 0
    """Keep only the backbone's first `stages` stages (0: all; -k: all but the last k): features from a
    mid-level stage, e.g. for volumes, where the last ImageNet stage transfers worst."""
    volume_encoder: str = field(default="auto", metadata=_choices(VolumeEncoder))
    """How a volume reaches a 2D backbone. 'channels': its slices are the input channels (the stem is
    adapted); 'slices': the backbone sees every slice (or group of `slice_group` adjacent slices as
    RGB) as an image, then `slice_pooling` over slices; 'views': the same along the three orthogonal
    directions, pooled over all of them; 'auto': channels for a .npz of volumes (one depth; the measured
    default), slices for NIfTI / DICOM-series rows of any depth (2D data is not affected)."""
    slice_pooling: str = field(default="attention", metadata=_choices(SlicePooling))
    """'attention': gated attention weights (trained with the head; they sum to 1 per volume), or
    'mean' / 'max' over slices."""
    slice_group: int = field(default=3, metadata={"min": 1, "max": 3})
    """1: each slice is a grayscale image; 3: each slice with its two neighbours as RGB (pretrained
    3-channel stem kept as it is)."""
    slice_stride: int = field(default=1, metadata={"min": 1})
    """Use every `slice_stride`-th slice (cost ∝ number of slices)."""


@dataclass
class TrainConfig:
    """The fine-tuning recipe: head-only epochs, then the whole network at a lower learning rate."""

    batch_size: int = field(default=16, metadata={"min": 1})
    head_epochs: int = field(default=3, metadata={"min": 0})
    finetune_epochs: int = field(default=5, metadata={"min": 0})
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    """Learning rate of the new head."""
    backbone_lr_mult: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    """Backbone learning rate after unfreezing = lr × this."""
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0})
    bn_policy: str = field(default="auto", metadata=_choices(BNPolicy))
    """BatchNorm in trainable layer groups. 'frozen': pretrained statistics used and not updated, no
    affine gradients (small batches); 'eval-stats': statistics fixed, affine parameters train;
    'train': both adapt; 'auto': frozen for pretrained weights, train for random initialisation.
    Norms in frozen groups are always frozen."""
    freeze: str = field(default="none", metadata=_choices(FreezeMode))
    """What stays frozen after the head-only epochs: nothing, the whole backbone (linear probe),
    all but the last `trainable_stages` layer groups, or the parameters matching `freeze_pattern`."""
    trainable_stages: int = field(default=1, metadata={"min": 0})
    freeze_pattern: str = ""
    """Regular expression on backbone parameter names (e.g. '^model\\.blocks\\.[0-2]\\.'), for freeze: pattern."""
    schedule: str = field(default="fine_tune", metadata=_choices(UnfreezeSchedule))
    """'fine_tune': head-only epochs, then every allowed group at once; 'gradual': one more layer
    group (from the top) every `unfreeze_every` epochs."""
    unfreeze_every: int = field(default=1, metadata={"min": 1})
    layer_lr_ratio: float = field(default=1.0, metadata={"min": 1e-6, "max": 1.0})
    """Discriminative LRs: the first layer group trains at lr × backbone_lr_mult × this, the last at
    lr × backbone_lr_mult, geometric in between (fastai's slice(lr/100, lr) is 0.01)."""
    lr_schedule: str = field(default="cosine", metadata=_choices(LRSchedule))
    """After the head-only epochs: per-step cosine decay, one-cycle (30% warm-up from lr/25, cosine
    down to lr/1e4), ReduceLROnPlateau per epoch, or constant."""
    plateau_monitor: str = field(default="val_loss", metadata=_choices(PlateauMonitor))
    plateau_factor: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    plateau_patience: int = field(default=5, metadata={"min": 0})
    min_lr: float = field(default=1e-6, metadata={"min": 0.0})
    grad_accum: int = field(default=1, metadata={"min": 1})
    """Optimizer step every this many batches (effective batch = batch_size × grad_accum)."""
    amp: str = field(default="auto", metadata=_choices(AMP))
    """Mixed precision on CUDA only ('auto': bf16 where supported, else fp16 with a GradScaler)."""
    channels_last: bool = True
    """channels-last memory format on CUDA for 2D models."""
    feature_cache: str = field(default="auto", metadata=_choices(Switch))
    """Head-only epochs on features computed once by the frozen backbone; 'auto': on when
    head_augment is false."""
    head_augment: bool = True
    """Augment during the head-only epochs (off lets the feature cache work)."""
    head_solver: str = field(default="sgd", metadata=_choices(HeadSolver))
    """'sgd': head_epochs epochs of the optimizer; 'logistic': one L2-regularised logistic regression on
    the cached features (C chosen on the validation AUC, or by 3-fold cross-validation without a
    validation split), for a linear head on a frozen backbone: set train.head_epochs=1 (the fit is
    the head phase's one epoch) and train.feature_cache on or auto."""
    tensorboard: bool = False
    """Also log to RUN_DIR/tensorboard (needs the tensorboard package)."""
    class_weighting: bool = True
    patience: int = field(default=0, metadata={"min": 0})
    """Early stopping after this many epochs without a better validation AUC (0: off)."""
    ensemble: int = field(default=1, metadata={"min": 1})
    """Train this many members (seeds seed, seed+1, …) on the same split and average their
    probabilities: K times the training time, less variance on small training sets."""
    time_limit_minutes: float = field(default=0.0, metadata={"min": 0.0})
    """Wall-clock limit for the whole run (0: none). Fine-tuning stops before an epoch that would not
    finish in time (the best checkpoint on validation is kept and evaluated), and an ensemble trains
    no further member than fits; metrics.json records what was cut."""
    adaptation: str = field(default="full", metadata=_choices(AdaptationMode))
    """How much of the pretrained backbone adapts after the head-only epochs: 'full' (all of it),
    'linear_probe' (nothing: the head trains on cached frozen features for head_epochs + finetune_epochs),
    'lora' (low-rank adapters on attention projections / convolutions, merged into model.pt), 'bitfit'
    (biases and norms), or 'auto' (train the candidates, keep the best on held-out data; see auto_*)."""
    adapter_lr_mult: float = field(default=1.0, metadata={"min": 0.0, "max": 10.0})
    """lora and bitfit: their trainable backbone parameters (adapters starting at zero, biases and norms) train
    at lr × this, one rate for every layer group (they are few; full fine-tuning's lr × backbone_lr_mult is
    usually too low for them)."""
    layer_decay: float = field(default=1.0, metadata={"min": 0.01, "max": 1.0})
    """Layer-wise learning-rate decay for full fine-tuning: layer group i of n trains at
    lr × backbone_lr_mult × layer_decay^(n-1-i) (e.g. 0.65, as RETFound; 1: off)."""
    lora_rank: int = field(default=8, metadata={"min": 1})
    lora_alpha: float = field(default=16.0, metadata={"min": 0.0})
    """LoRA scaling: the update is (alpha / rank) × B A."""
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})
    lora_targets: list[str] = field(default_factory=list)
    """Regular expressions on backbone module names to adapt (empty: the attention projections of a vision
    transformer, or the convolutions with one group of a CNN)."""
    auto_candidates: list[str] = field(default_factory=lambda: ["linear_probe", "bitfit", "lora", "full"])
    """The adaptation modes adaptation=auto trains and compares."""
    auto_protocol: str = field(default="auto", metadata=_choices(SelectionProtocol))
    """How auto compares candidates: 'validation' (their validation AUC), 'cv' (patient-grouped k-fold
    cross-validation over train + val, then the chosen mode trained on train + val), 'auto' (cv when the
    validation split's smallest class has fewer than auto_min_val_per_class images)."""
    auto_min_val_per_class: int = field(default=50, metadata={"min": 1})
    auto_folds: int = field(default=3, metadata={"min": 2, "max": 10})
    device: str = "auto"
    seed: int = 0


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``config.yaml`` in every run directory."""

    modality: str = "xray"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def available_presets() -> list[str]:
    """Names of the modality presets shipped in ``medtransfer/configs``."""
    root = resources.files("medtransfer.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_dict(modality: str) -> dict[str, Any]:
    presets = available_presets()
    if modality not in presets:
        raise ConfigError(
            f"Unknown modality preset '{modality}'.{did_you_mean(modality, presets)} "
            f"Available presets: {', '.join(presets)}."
        )
    text = resources.files("medtransfer.configs").joinpath(f"{modality}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.epochs=3"`` → ``{"train": {"epochs": 3}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like section.key=value, e.g. train.head_epochs=2.")
    dotted, raw = text.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"Override '{text}' has an empty key; use section.key=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override '{text}': the value is not valid YAML ({exc}).") from None
    out: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        out = {key: out}
    return out


def _coerce(value: Any, typ: Any, where: str, meta: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return [_coerce(v, item_type, f"{where}[{i}]", {}) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        value = float(value)
    elif typ is str:
        word = "on" if value is True else "off" if value is False else None
        if word and word in meta.get("choices", ()):
            value = word  # YAML 1.1 reads on/off as booleans (train.amp=off, train.feature_cache=on)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        value = str(value)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{where} = {value!r} is not allowed.{did_you_mean(str(value), choices)} "
            f"Valid values: {', '.join(choices)}."
        )
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where} = {value!r} is below its minimum {meta['min']}.")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where} = {value!r} is above its maximum {meta['max']}.")
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {values!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"Unknown config key '{dotted}'.{did_you_mean(str(key), fields, where + '.' if where else '')} "
                f"Valid keys{' in ' + where if where else ''}: {', '.join(fields)}."
            )
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, dotted)
        else:
            kwargs[key] = _coerce(value, typ, dotted, fields[key].metadata)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Validate a plain dict (e.g. a saved ``config.yaml``) into a :class:`RunConfig`: every key and
    value, then the values that only make sense together (checked here, before any work, rather than
    failing mid-epoch)."""
    cfg = _build(RunConfig, values, "")
    _check_together(cfg)
    return cfg


def _check_adaptation(t: TrainConfig) -> None:
    modes = [m for m in AdaptationMode.values() if m != AdaptationMode.AUTO]
    bad = [m for m in t.auto_candidates if m not in modes]
    if t.adaptation == AdaptationMode.AUTO and (not t.auto_candidates or bad or len(set(t.auto_candidates)) < len(t.auto_candidates)):
        raise ConfigError(f"train.auto_candidates = {t.auto_candidates} must name distinct modes among {', '.join(modes)}"
                          f"{' (not ' + ', '.join(map(repr, bad)) + ')' if bad else ''}.")
    if t.adaptation == AdaptationMode.AUTO and t.ensemble > 1:
        raise ConfigError("train.adaptation = auto trains one model per candidate; it does not combine with "
                          "train.ensemble > 1. Choose a mode (e.g. the one auto picked) for an ensemble.")
    if t.layer_decay < 1.0 and t.adaptation not in (AdaptationMode.FULL, AdaptationMode.AUTO):
        raise ConfigError(f"train.layer_decay applies to full fine-tuning; train.adaptation is {t.adaptation}. "
                          "Set train.adaptation=full (or auto) or train.layer_decay=1.")
    if t.layer_decay < 1.0 and t.layer_lr_ratio < 1.0:
        raise ConfigError("train.layer_decay and train.layer_lr_ratio both set per-layer learning rates; use one "
                          "(layer_decay=0.65 decays by layer, layer_lr_ratio=0.01 spans the groups geometrically).")
    for pattern in t.lora_targets:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"train.lora_targets entry {pattern!r} is not a valid regular expression ({exc}).") from None


def _check_head_solver(cfg: RunConfig) -> None:
    t = cfg.train
    if t.head_solver != HeadSolver.LOGISTIC:
        return
    head = t.head_epochs + (t.finetune_epochs if t.adaptation == AdaptationMode.LINEAR_PROBE else 0)
    problems = [
        (head != 1, f"the head phase has {head} epochs: set train.head_epochs=1"
                    + (" and train.finetune_epochs=0 (a linear probe trains only the head)"
                       if t.adaptation == AdaptationMode.LINEAR_PROBE else "")),
        (cfg.model.head != Head.LINEAR, f"model.head is {cfg.model.head}: set model.head=linear"),
        (t.feature_cache == Switch.OFF, "train.feature_cache is off: set it to auto or on"),
        (t.head_augment, "train.head_augment is true: set it to false (the fit sees each cached feature once)"),
        (t.adaptation == AdaptationMode.AUTO, "train.adaptation is auto: choose one mode"),
    ]
    found = [why for bad, why in problems if bad]
    if found:
        raise ConfigError("train.head_solver = logistic fits a linear head once on the frozen backbone's cached "
                          "features, but " + "; ".join(found) + ". Or use train.head_solver=sgd.")


def _check_together(cfg: RunConfig) -> None:
    _check_adaptation(cfg.train)
    _check_head_solver(cfg)
    if cfg.data.val_fraction + cfg.data.test_fraction >= 0.95:
        raise ConfigError(
            "data.val_fraction + data.test_fraction must leave at least 5% of patients for training."
        )
    pct = cfg.data.percentiles
    if len(pct) != 2 or not 0.0 <= pct[0] < pct[1] <= 100.0:
        raise ConfigError(f"data.percentiles = {pct} must be two percentiles [low, high] with 0 <= low < high "
                          "<= 100, e.g. [0.5, 99.5].")
    if cfg.train.freeze == FreezeMode.PATTERN:
        if not cfg.train.freeze_pattern:
            raise ConfigError("train.freeze = pattern needs train.freeze_pattern, a regular expression on "
                              "backbone parameter names, e.g. '^model\\.blocks\\.[0-2]\\.'.")
        try:
            re.compile(cfg.train.freeze_pattern)
        except re.error as exc:
            raise ConfigError(f"train.freeze_pattern = {cfg.train.freeze_pattern!r} is not a valid regular "
                              f"expression ({exc}).") from None


def check_weights_file(weights: str, key: str = "model.weights") -> None:
    """A weights file given by path must exist (checked before any work, not when the backbone loads)."""
    if weights in ("pretrained", "none"):
        return
    if not Path(weights).expanduser().is_file():
        raise ConfigError(f"{key} = {weights!r}: no such file. Pass 'pretrained', 'none' (random initialisation) "
                          "or the path of a .pth / .pt / .safetensors file.")


def read_user_yaml(config_file: str | Path) -> dict[str, Any]:
    """A user's ``--config`` file as a dict of sections; ConfigError when missing or malformed."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist.")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections.")
    return user


def load_config(
    modality: str = "xray",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Resolve preset → user YAML → overrides into a validated :class:`RunConfig`."""
    values = preset_dict(modality)
    values["modality"] = modality
    if config_file is not None:
        values = _deep_merge(values, read_user_yaml(config_file))
    for text in overrides or []:
        values = _deep_merge(values, parse_override(text))
    return config_from_dict(values)
