"""The vocabulary of options: one ``StrEnum`` per choice, read by config validation and compared
by the code instead of string literals (MONAI's ``utils/enums.py`` + ``look_up_option`` idea).

Members are ``str``: ``Task.BINARY == "binary"`` holds, a config keeps plain strings, and
:func:`look_up_option` turns a user's string into a member or answers with the valid values.
"""
from __future__ import annotations

from enum import Enum
from typing import TypeVar

from medtransfer._suggest import did_you_mean
from medtransfer.errors import ConfigError


class StrEnum(str, Enum):
    """A string-valued enum (``enum.StrEnum`` is Python ≥ 3.11 only)."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Task(StrEnum):
    """What the head predicts (see :mod:`medtransfer.transfer.tasks` for each one's loss and rule)."""

    AUTO = "auto"
    BINARY = "binary"
    MULTICLASS = "multiclass"
    MULTILABEL = "multilabel"
    ORDINAL = "ordinal"


class FreezeMode(StrEnum):
    """What stays frozen after the head-only epochs."""

    NONE = "none"
    BACKBONE = "backbone"
    ALL_BUT_LAST = "all_but_last"
    PATTERN = "pattern"


class BNPolicy(StrEnum):
    """BatchNorm in trainable layer groups (``auto`` is resolved per run and recorded)."""

    AUTO = "auto"
    FROZEN = "frozen"
    EVAL_STATS = "eval-stats"
    TRAIN = "train"


class AdaptationMode(StrEnum):
    """How much of the pretrained backbone adapts (see :mod:`medtransfer.transfer.adaptation`); ``auto``
    trains the candidates and keeps the best on held-out data (:mod:`medtransfer.train.auto`)."""

    FULL = "full"
    LINEAR_PROBE = "linear_probe"
    LORA = "lora"
    BITFIT = "bitfit"
    AUTO = "auto"


class SelectionProtocol(StrEnum):
    """How ``train.adaptation = auto`` compares its candidates: on the validation split, by patient-grouped
    k-fold cross-validation over train + val, or ``auto``: cross-validation when the validation split is
    too small to rank them."""

    AUTO = "auto"
    VALIDATION = "validation"
    CV = "cv"


class UnfreezeSchedule(StrEnum):
    FINE_TUNE = "fine_tune"
    GRADUAL = "gradual"


class LRSchedule(StrEnum):
    COSINE = "cosine"
    ONECYCLE = "onecycle"
    PLATEAU = "plateau"
    CONSTANT = "constant"


class PlateauMonitor(StrEnum):
    VAL_LOSS = "val_loss"
    VAL_AUC = "val_auc"


class AMP(StrEnum):
    """Mixed precision on CUDA."""

    AUTO = "auto"
    OFF = "off"
    BF16 = "bf16"
    FP16 = "fp16"


class Switch(StrEnum):
    """A three-way switch (``auto`` is resolved per run and recorded)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Head(StrEnum):
    LINEAR = "linear"
    MLP = "mlp"


class HeadSolver(StrEnum):
    """How the head-only phase fits the new head (see :mod:`medtransfer.train.head_solver`)."""

    SGD = "sgd"
    """Epochs of the run's optimizer on the frozen backbone's outputs (or cached features)."""
    LOGISTIC = "logistic"
    """One closed-form fit: L2-regularised logistic regression on the cached, standardised features, its
    strength chosen on the validation AUC, folded into the linear head."""


class VolumeEncoder(StrEnum):
    """How a volume reaches a 2D backbone (see :mod:`medtransfer.transfer.volume`)."""

    AUTO = "auto"
    CHANNELS = "channels"
    SLICES = "slices"
    VIEWS = "views"


class SlicePooling(StrEnum):
    """How a volume's slice features become one feature vector."""

    ATTENTION = "attention"
    MEAN = "mean"
    MAX = "max"


class OutsidePaths(StrEnum):
    """Files of a labels CSV outside ``--data``."""

    WARN = "warn"
    FORBID = "forbid"


class Window(StrEnum):
    """Intensity window of 2D inputs."""

    TAGS = "tags"
    PERCENTILE = "percentile"
    NONE = "none"


E = TypeVar("E", bound=StrEnum)


def look_up_option(value: str | E, options: type[E], where: str = "value") -> E:
    """``value`` as a member of ``options``; a ConfigError naming the valid values (and the closest one)."""
    if isinstance(value, options):
        return value
    try:
        return options(str(value))
    except ValueError:
        choices = options.values()
        raise ConfigError(f"{where} = {value!r} is not allowed.{did_you_mean(str(value), choices)} "
                          f"Valid values: {', '.join(choices)}.") from None
