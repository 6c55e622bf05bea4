"""Package-wide exception types. Each message says what failed, why, and how to fix it.

Every failure a user can cause or meet is a :class:`MedTransferError`; its ``exit_code`` is what
the command line returns: 1 the job failed, 2 bad usage or configuration (found before any work),
3 weights that are not available.
"""
from __future__ import annotations


class MedTransferError(Exception):
    """Base class of every error medtransfer raises on purpose."""

    exit_code = 1


class UsageError(MedTransferError):
    """The command was used in a way that cannot work (bad option combination, a non-empty run directory)."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A configuration key or value is invalid (raised before any work starts)."""


class WeightsUnavailableError(MedTransferError):
    """Pretrained weights were asked for but cannot be found (offline, not installed, not cached)."""

    exit_code = 3


class DataError(MedTransferError):
    """The dataset given cannot be used as it is (missing files, bad labels, leakage)."""
