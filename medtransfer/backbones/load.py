"""Building a backbone and loading its weights, with the checkpoint adapted to the target network.

Nothing is dropped silently: every tensor of the target network is either loaded as it is, adapted
(and the report says how), or re-initialised on purpose (and the report says why); every checkpoint
tensor not used is listed as discarded with the reason. Any other mismatch raises.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtransfer.backbones.adapt import (
    INFLATE_MODES,
    ChannelMap,
    adapt_input_conv,
    convert_to_3d,
    inflate_conv_weight,
    map_input_channels,
    truncate,
)
from medtransfer.backbones.checkpoint import (
    KEY_LAYOUTS,
    CheckpointError,
    read_state_dict,
    sha256_file,
    sha256_matches,
    tensors_sha256,
)
from medtransfer.backbones.hf_contract import check_sidecar_files
from medtransfer.backbones.registry import WeightSpec
from medtransfer.backbones.sources import CacheSource, FileSource
from medtransfer.backbones.vit import describe_input_grid
from medtransfer.errors import ConfigError, WeightsUnavailableError

__all__ = [
    "CheckpointError",
    "LoadReport",
    "adapt_input_conv",
    "load_backbone",
    "locate_weights",
    "read_state_dict",
    "sha256_file",
]

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to every tensor of the backbone when its weights were loaded."""

    weights: str
    source: str = "random initialisation"
    file: str | None = None
    sha256: str | None = None
    loaded: list[str] = field(default_factory=list)
    adapted: list[dict[str, Any]] = field(default_factory=list)
    reinitialised: list[dict[str, str]] = field(default_factory=list)
    discarded: list[dict[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    converted: list[dict[str, Any]] = field(default_factory=list)
    """dtype conversions on loading: ``{"from", "to", "tensors"}`` (e.g. bfloat16 → float32)."""
    num_features: int | None = None
    input_grid: str | None = None
    """Vision transformers: how inputs of the run's size are adapted (padding, position embeddings)."""
    licence: str | None = None
    """The weights' licence (pretrained or a file), shown with the report."""
    checked_files: list[str] = field(default_factory=list)
    """Files beside the weights checked against the registry (``config.json``, ``preprocessor_config.json``)."""
    volume_encoder: str | None = None
    """How volumes reach a 2D backbone (slices as channels, slice-wise, orthogonal views) and their pooling."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
        os.replace(tmp, p)
        return p

    def summary(self) -> str:
        lines = [f"weights: {self.weights} from {self.source}" + (f" ({self.file})" if self.file else "")]
        lines.append(
            f"  loaded as is: {len(self.loaded)} tensors; adapted: {len(self.adapted)}; "
            f"re-initialised: {len(self.reinitialised)}; discarded: {len(self.discarded)}; "
            f"unexpected: {len(self.unexpected)}; missing: {len(self.missing)}"
        )
        if self.licence:
            lines.append(f"  licence: {self.licence}")
        if self.input_grid:
            lines.append(f"  input: {self.input_grid}")
        if self.volume_encoder:
            lines.append(f"  volumes: {self.volume_encoder}")
        lines += [f"  checked {c}" for c in self.checked_files]
        for c in self.converted:
            lines.append(f"  converted {c['tensors']} tensors {c['from']} -> {c['to']} (the checkpoint's dtype -> the model's)")
        for a in self.adapted[:10]:
            lines.append(f"  adapted {a['key']}: {a['from']} -> {a['to']} ({a['how']})")
        if len(self.adapted) > 10:
            lines.append(f"  ... and {len(self.adapted) - 10} more adapted tensors ({self.adapted[-1]['how']})")
        for r in self.reinitialised[:10]:
            lines.append(f"  re-initialised {r['key']}: {r['why']}")
        if len(self.reinitialised) > 10:
            lines.append(f"  ... and {len(self.reinitialised) - 10} more re-initialised tensors")
        reasons: dict[str, int] = {}
        for d in self.discarded:
            reasons[d["why"]] = reasons.get(d["why"], 0) + 1
        for why, n in reasons.items():
            lines.append(f"  discarded {n} checkpoint tensors: {why}")
        return "\n".join(lines)


def locate_weights(spec: WeightSpec) -> tuple[Path, str]:
    """Find ``spec``'s file: the local cache, then the registry's sources in order.

    Raises :class:`WeightsUnavailableError` listing what each source said (what to place where).
    """
    if not spec.sources:
        raise WeightsUnavailableError(
            f"'{spec.name}' has no pretrained weights (it is a random-initialisation entry); "
            "use --weights none, or pass --weights PATH."
        )
    errors = []
    for source in (CacheSource(), *spec.sources):
        try:
            return source.locate(spec.name), source.describe()
        except WeightsUnavailableError as exc:
            if not isinstance(source, CacheSource | FileSource):
                errors.append(str(exc))
    terms = "" if spec.redistributable else f" Licence: {spec.license}."
    raise WeightsUnavailableError(f"No weights found for '{spec.name}'. " + " / ".join(errors) + terms)


def _by_order(spec: WeightSpec, ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream tensors in the same order as the timm architecture *with* its classifier."""
    import timm

    with torch.device("meta"):
        full = timm.create_model(spec.builder.arch, pretrained=False)  # type: ignore[attr-defined]
    target_keys = ["model." + k for k in full.state_dict()]
    if len(ckpt) != len(target_keys):
        raise CheckpointError(
            f"Checkpoint for '{spec.name}' has {len(ckpt)} tensors; the architecture has "
            f"{len(target_keys)}. Is it the right file for this backbone?"
        )
    return dict(zip(target_keys, ckpt.values()))


def matches_registered(spec: WeightSpec, digest: str, path: str | os.PathLike[str]) -> bool:
    """True when the file ``path`` (sha256 ``digest``) holds ``spec``'s registered weights: its sha256
    matches, or else its tensors match ``spec.tensors_sha256`` (read only then); True when the
    registry knows neither."""
    if not spec.sha256 and not spec.tensors_sha256:
        return True
    if spec.sha256 and sha256_matches(digest, spec.sha256):
        return True
    if not spec.tensors_sha256:
        return False
    try:
        return tensors_sha256(read_state_dict(path)) == spec.tensors_sha256
    except CheckpointError:
        return False


def map_checkpoint(spec: WeightSpec, ckpt: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename upstream keys to the builder's names according to ``spec.key_layout``."""
    if spec.key_layout == "by_order":
        return ckpt if set(ckpt) & target_keys else _by_order(spec, ckpt)
    if spec.key_layout not in KEY_LAYOUTS:
        raise ConfigError(f"Unknown key layout '{spec.key_layout}' for '{spec.name}'; known: {sorted(KEY_LAYOUTS)}.")
    return KEY_LAYOUTS[spec.key_layout](ckpt)


def load_backbone(
    spec: WeightSpec,
    in_channels: int,
    weights: str | os.PathLike[str] = "pretrained",
    *,
    dims: int | None = None,
    inflate: str = "average",
    stages: int | None = None,
    channel_map: ChannelMap | None = None,
    input_size: int | tuple[int, int] | None = None,
) -> tuple[nn.Module, LoadReport]:
    """Build ``spec``'s backbone for ``in_channels`` inputs and load ``weights`` into it.

    ``weights``: ``"pretrained"`` (the local cache, then the registry's sources in order),
    ``"none"`` (random initialisation, on purpose) or a file path. ``dims=3`` on a 2D weight
    inflates it (``inflate``: ``"average"`` or ``"centre"``); ``stages=k`` keeps the first ``k``
    stages; ``channel_map`` picks the source channels of each input channel (see
    :func:`map_input_channels`); ``input_size`` (the run's image size) lets the report say how a vision
    transformer adapts to it. Returns the module (``num_features`` set) and its :class:`LoadReport`.
    """
    if channel_map is not None and len(channel_map) != in_channels:
        raise ConfigError(f"channel_map has {len(channel_map)} entries but in_channels is {in_channels}.")
    if inflate not in INFLATE_MODES:
        raise ConfigError(f"Unknown inflation mode '{inflate}'; choose one of {INFLATE_MODES}.")
    dims = dims or spec.dims
    if dims not in (2, 3) or dims < spec.dims:
        raise ConfigError(f"'{spec.name}' is a {spec.dims}D backbone; it cannot be used as {dims}D.")
    model = spec.builder(in_channels)
    if dims == 3 and spec.dims == 2:
        convert_to_3d(model)
    removed = set(truncate(model, stages)) if stages is not None else set()
    weights = str(weights)
    report = LoadReport(weights=spec.name if weights == "pretrained" else weights)
    report.input_grid = describe_input_grid(model, input_size) if input_size is not None else None
    target = model.state_dict()
    if weights == "none":
        report.reinitialised = [{"key": k, "why": "random initialisation requested (--weights none)"} for k in target]
        report.num_features = model.num_features
        return model, report
    if weights == "pretrained":
        path, source = locate_weights(spec)
    else:
        path, source = Path(weights).expanduser(), "explicit file"
    digest = sha256_file(path)
    if weights == "pretrained" and not matches_registered(spec, digest, path):
        raise CheckpointError(
            f"sha256 of '{path}' is {digest}, expected {spec.sha256} for '{spec.name}'. "
            "The file is corrupt or not the registered weights; delete it and pull/import it again, "
            "or pass --weights PATH to use it deliberately."
        )
    report.source, report.file, report.sha256, report.licence = source, str(path), digest, spec.license
    report.checked_files = check_sidecar_files(spec, path)
    ckpt = map_checkpoint(spec, read_state_dict(path), set(target))
    state = _adapt_checkpoint(spec, ckpt, target, removed, report, str(path), inflate, channel_map, stages)
    model.load_state_dict(state, strict=True)
    report.num_features = model.num_features
    logger.info("%s", report.summary())
    return model, report


def _adapt_checkpoint(
    spec: WeightSpec,
    ckpt: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    removed: set[str],
    report: LoadReport,
    path: str,
    inflate: str,
    channel_map: ChannelMap | None,
    stages: int | None,
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    conversions: dict[tuple[str, str], int] = {}
    first_conv_w = f"{spec.first_conv}.weight"
    classifier_prefix = f"{spec.classifier}." if spec.classifier else None
    for key, tensor in ckpt.items():
        if classifier_prefix and key.startswith(classifier_prefix):
            report.reinitialised.append(
                {"key": key, "why": "upstream classifier removed; a new head is trained for this task"}
            )
            continue
        if key in removed:
            report.discarded.append({"key": key, "why": f"stage removed by truncation (stages={stages})"})
            continue
        if any(key == p or key.startswith(p) for p in spec.discard):
            report.discarded.append({"key": key, "why": f"not part of the {spec.architecture} backbone (upstream-only)"})
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        hows = []
        if key == first_conv_w and (channel_map is not None or tensor.shape[1] != want[1]):
            tensor, how = map_input_channels(tensor, channel_map) if channel_map is not None else adapt_input_conv(tensor, want[1])
            hows.append(how)
        if tensor.ndim == 4 and len(want) == 5:
            tensor = inflate_conv_weight(tensor, want[2], inflate)
            hows.append(f"inflated 2D->3D over depth {want[2]} ({inflate})")
        if tensor.shape != want:
            raise CheckpointError(
                f"Tensor '{key}' has shape {tuple(tensor.shape)} in '{path}' but {tuple(want)} in "
                f"'{spec.name}'. This is not a planned adaptation; check that the file belongs to this backbone."
            )
        pair = (str(ckpt[key].dtype), str(target[key].dtype))
        if pair[0] != pair[1]:
            conversions[pair] = conversions.get(pair, 0) + 1
        state[key] = tensor.to(target[key].dtype)
        if hows:
            report.adapted.append({"key": key, "from": list(ckpt[key].shape), "to": list(want), "how": "; ".join(hows)})
        else:
            report.loaded.append(key)
    report.converted = [{"from": a.replace("torch.", ""), "to": b.replace("torch.", ""), "tensors": n}
                        for (a, b), n in conversions.items()]
    _complete(spec, state, target, report, path)
    return state


def _complete(spec: WeightSpec, state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
              report: LoadReport, path: str) -> None:
    """Fill BatchNorm counters older checkpoints lack; raise when anything else is missing or unexpected."""
    for key in target:
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(target[key])
            report.reinitialised.append({"key": key, "why": "not in the checkpoint (older PyTorch); set to 0"})
    report.missing = [k for k in target if k not in state]
    if report.unexpected or report.missing:
        raise CheckpointError(
            f"'{path}' does not fit '{spec.name}': {len(report.missing)} missing tensors "
            f"(e.g. {report.missing[:3]}), {len(report.unexpected)} unexpected (e.g. {report.unexpected[:3]})."
        )
