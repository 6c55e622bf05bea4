"""Package-wide exception types. Each message says what failed, why, and how to fix it."""
from __future__ import annotations


class MedTransferError(Exception):
    """Base class of every error medtransfer raises on purpose."""


class ConfigError(MedTransferError, ValueError):
    """A configuration key or value is invalid (raised before any work starts)."""


class WeightsUnavailableError(MedTransferError):
    """Pretrained weights were asked for but cannot be found (offline, not installed, not cached)."""


class DataError(MedTransferError):
    """The dataset given cannot be used as it is (missing files, bad labels, leakage)."""
