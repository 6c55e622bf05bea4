"""PACS addresses (``dicomweb://…``, ``dimse://AET@HOST:PORT``) and connection settings.

A PACS is named by a URL whose query string holds the search keys:

* ``dicomweb://HOST:PORT/dicom-web?StudyDate=20240101-20240131&Modality=CR`` (HTTP) and
  ``dicomwebs://…`` (HTTPS): QIDO-RS / WADO-RS / STOW-RS under the URL's path;
* ``dimse://AET@HOST:PORT?AccessionNumber=A123``: C-FIND / C-GET or C-MOVE / C-STORE to the
  application entity ``AET``.

Search keys are DICOM keywords with DICOM matching values (wildcards ``*``, date ranges
``20240101-20240131``, UID lists). Credentials never appear in a URL, a log line or a message:
they come from an environment variable or a file named in the settings.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from medtransfer._suggest import did_you_mean
from medtransfer.errors import ConfigError, MedTransferError

logger = logging.getLogger(__name__)

SCHEMES = ("dicomweb", "dicomwebs", "dimse")
T = TypeVar("T")


class PacsError(MedTransferError):
    """A PACS request failed; ``reason`` starts with the failure kind (``not retrievable``,
    ``timed out`` or ``rejected``) followed by what the PACS or the network said."""

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def not_retrievable(detail: str, transient: bool = True) -> PacsError:
    return PacsError(f"not retrievable: {detail}", transient)


def timed_out(detail: str) -> PacsError:
    return PacsError(f"timed out: {detail}", transient=True)


def rejected(detail: str) -> PacsError:
    return PacsError(f"rejected: {detail}", transient=False)


@dataclass(frozen=True)
class PacsEndpoint:
    """Where a PACS is and what to ask it: ``scheme`` dicomweb / dicomwebs / dimse."""

    scheme: str
    host: str
    port: int
    path: str = ""
    called_aet: str = ""
    query: tuple[tuple[str, str], ...] = ()

    @property
    def is_dimse(self) -> bool:
        return self.scheme == "dimse"

    @property
    def base_url(self) -> str:
        """The DICOMweb service root (``http(s)://host:port/path``)."""
        http = "https" if self.scheme == "dicomwebs" else "http"
        return f"{http}://{self.host}:{self.port}{self.path.rstrip('/')}"

    def describe(self) -> str:
        """The address without search keys (safe to log: it never holds credentials)."""
        if self.is_dimse:
            return f"dimse://{self.called_aet}@{self.host}:{self.port}"
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"

    def search_keys(self) -> dict[str, str]:
        return dict(self.query)


def is_pacs_url(text: str | os.PathLike[str]) -> bool:
    """True for ``dicomweb://``, ``dicomwebs://`` and ``dimse://`` addresses."""
    return str(text).split("://", 1)[0].lower() in SCHEMES and "://" in str(text)


def parse_pacs_url(url: str) -> PacsEndpoint:
    """Parse a PACS address; search keys are checked against the DICOM dictionary."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"'{url.split('?')[0]}' is not a PACS address: use dicomweb://HOST:PORT/PATH, "
                          "dicomwebs://… (HTTPS) or dimse://AET@HOST:PORT.")
    if parts.password is not None:
        raise ConfigError("A PACS address must not carry a password. Name an environment variable or a file "
                          "instead: --pacs-set password_env=VAR (or password_file=PATH).")
    if not parts.hostname or parts.port is None:
        raise ConfigError(f"'{scheme}://{parts.netloc}' needs a host and a port, e.g. {scheme}://pacs.example:"
                          + ("11112" if scheme == "dimse" else "8042/dicom-web") + ".")
    aet = parts.username or ""
    if scheme == "dimse" and not aet:
        raise ConfigError(f"'dimse://{parts.netloc}' needs the PACS's AE title: dimse://AET@{parts.netloc}.")
    if scheme == "dimse" and (len(aet) > 16 or not aet.strip()):
        raise ConfigError(f"AE title '{aet}' must be 1-16 characters.")
    if scheme != "dimse" and aet:
        raise ConfigError("Put the DICOMweb user name in the settings (--pacs-set username=NAME), not in the URL.")
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    for key, _ in query:
        check_keyword(key, "search key")
    return PacsEndpoint(scheme, parts.hostname, parts.port, parts.path if scheme != "dimse" else "", aet, query)


def check_keyword(keyword: str, what: str) -> str:
    """``keyword`` if it names a DICOM attribute, else a :class:`ConfigError` with a suggestion."""
    from pydicom.datadict import keyword_dict

    if keyword not in keyword_dict:
        raise ConfigError(f"Unknown DICOM keyword '{keyword}' in the {what}.{did_you_mean(keyword, keyword_dict)} "
                          "Use DICOM keywords such as StudyDate, Modality, AccessionNumber, SeriesDescription.")
    return keyword


_SECRET_FIELDS = ("password", "token")


@dataclass
class ConnectionSettings:
    """How medtransfer talks to a PACS. Secrets are read when needed and never printed."""

    calling_aet: str = "MEDTRANSFER"
    """Our AE title (DIMSE)."""
    timeout: float = 30.0
    """Seconds to wait for a connection, an answer or the next data (HTTP, ACSE, DIMSE, network)."""
    retries: int = 2
    """Attempts after the first for transient failures (connection refused, timeouts, HTTP 5xx)."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled before each further one."""
    retrieve: str = "get"
    """DIMSE retrieval: ``get`` (C-GET on the same association) or ``move`` (C-MOVE to our storage SCP)."""
    move_aet: str = ""
    """AE title of our storage SCP for C-MOVE (default: ``calling_aet``); the PACS must know it."""
    move_port: int = 11113
    """Port of our storage SCP for C-MOVE."""
    move_bind: str = "0.0.0.0"
    """Address our storage SCP listens on for C-MOVE."""
    chunk_size: int = 64
    """Instances retrieved per chunk (the spool on disk holds at most three chunks)."""
    spool_dir: str = ""
    """Folder for the spool of retrieved images (default: beside the output table)."""
    username: str = ""
    """DICOMweb HTTP basic authentication user (the password comes from password_env / password_file)."""
    password_env: str = ""
    password_file: str = ""
    password: str = field(default="", repr=False)
    """Only from a settings file, never from the command line."""
    token_env: str = ""
    """Environment variable holding a bearer token (``Authorization: Bearer …``)."""
    token_file: str = ""
    token: str = field(default="", repr=False)
    ca_cert: str = ""
    """CA bundle to verify the DICOMweb server's certificate (dicomwebs://)."""
    client_cert: str = ""
    """Client certificate (PEM) for mutual TLS; ``client_key`` its key."""
    client_key: str = ""
    verify_tls: bool = True

    def __post_init__(self) -> None:
        if self.retrieve not in ("get", "move"):
            raise ConfigError(f"retrieve must be 'get' or 'move', not '{self.retrieve}'.")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.chunk_size < 1:
            raise ConfigError("timeout must be > 0, retries and backoff >= 0, chunk_size >= 1.")
        for name in ("calling_aet", "move_aet"):
            value = getattr(self, name)
            if len(value) > 16:
                raise ConfigError(f"{name} '{value}' is longer than the 16 characters an AE title may have.")

    @property
    def store_aet(self) -> str:
        return self.move_aet or self.calling_aet

    def secret(self, kind: str) -> str:
        """The password or token from the settings file, its environment variable or its file ('' if none)."""
        direct, env, file = (getattr(self, kind), getattr(self, f"{kind}_env"), getattr(self, f"{kind}_file"))
        if direct:
            return direct
        if env:
            if env not in os.environ:
                raise ConfigError(f"The {kind} should come from the environment variable {env}, which is not set.")
            return os.environ[env]
        if file:
            try:
                return Path(file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"Cannot read the {kind} file {file}: {exc.strerror}.") from None
        return ""

    def describe(self) -> str:
        """A one-line summary that names where secrets come from, never their values."""
        auth = ("bearer token" if (self.token or self.token_env or self.token_file)
                else f"basic auth as {self.username}" if self.username else "no authentication")
        return (f"AE {self.calling_aet}, timeout {self.timeout:g} s, {self.retries} retries, {auth}, "
                f"DIMSE retrieval C-{self.retrieve.upper()}")

    def __repr__(self) -> str:  # dataclass repr would be fine, but be explicit: secrets stay out
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SECRET_FIELDS}
        return f"ConnectionSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def load_settings(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> ConnectionSettings:
    """Settings from a YAML file (keys as in :class:`ConnectionSettings`), then ``key=value`` overrides.

    A password or token may be written in the file (protect it); on the command line only the
    name of its environment variable or file is accepted, as command lines are visible to others.
    """
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"Cannot read the PACS settings file {path}: {exc}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"The PACS settings file {path} must hold a mapping of key: value.")
        values.update(loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--pacs-set '{item}' must be key=value, e.g. --pacs-set timeout=10.")
        if key.strip() in _SECRET_FIELDS:
            raise ConfigError(f"A {key.strip()} is never given on the command line (others can read it). "
                              f"Use --pacs-set {key.strip()}_env=VARIABLE or {key.strip()}_file=PATH.")
        values[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return _settings_from(values)


def _settings_from(values: Mapping[str, Any]) -> ConnectionSettings:
    known = {f.name: f for f in fields(ConnectionSettings)}
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"Unknown PACS setting '{key}'.{did_you_mean(key, known)} "
                              f"Settings: {', '.join(sorted(known))}.")
        default = known[key].default
        try:
            clean[key] = type(default)(value) if not isinstance(default, bool) else _as_bool(value)
        except (TypeError, ValueError):
            raise ConfigError(f"PACS setting {key} must be a {type(default).__name__}.") from None
    return replace(ConnectionSettings(), **clean)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def with_retries(action: Callable[[], T], settings: ConnectionSettings, what: str) -> T:
    """Run ``action``; a transient :class:`PacsError` is retried ``settings.retries`` times with
    exponential backoff, then re-raised with the number of attempts in its reason."""
    delay = settings.backoff
    for attempt in range(settings.retries + 1):
        try:
            return action()
        except PacsError as exc:
            if not exc.transient or attempt == settings.retries:
                if attempt:
                    raise PacsError(f"{exc.reason} (after {attempt + 1} attempts)", exc.transient) from None
                raise
            logger.info("%s failed (%s); retry %d of %d in %.1f s", what, exc.reason, attempt + 1,
                        settings.retries, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
