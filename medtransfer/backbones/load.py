"""Safe checkpoint loading, adaptation of the checkpoint to the target network, and the load report.

Nothing is dropped silently: every tensor of the target network is either loaded as it is, adapted
(and the report says how), or re-initialised on purpose (and the report says why). Any other
mismatch raises.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtransfer.backbones.registry import WeightSpec
from medtransfer.errors import MedTransferError, WeightsUnavailableError

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(MedTransferError):
    """A checkpoint cannot be loaded safely or does not fit the network."""


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
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"weights: {self.weights} from {self.source}" + (f" ({self.file})" if self.file else "")]
        lines.append(
            f"  loaded as is: {len(self.loaded)} tensors; adapted: {len(self.adapted)}; "
            f"re-initialised: {len(self.reinitialised)}; unexpected: {len(self.unexpected)}; "
            f"missing: {len(self.missing)}"
        )
        for a in self.adapted:
            lines.append(f"  adapted {a['key']}: {a['from']} -> {a['to']} ({a['how']})")
        for r in self.reinitialised[:10]:
            lines.append(f"  re-initialised {r['key']}: {r['why']}")
        if len(self.reinitialised) > 10:
            lines.append(f"  ... and {len(self.reinitialised) - 10} more re-initialised tensors")
        return "\n".join(lines)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a flat ``{name: tensor}`` dict, safely.

    Pickle checkpoints are read with ``weights_only=True``; one that needs arbitrary code to
    unpickle is refused. Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped and
    ``module.`` / ``_orig_mod.`` removed where they are prefixes (never inside a name).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"Weights file '{p}' does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p))
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"Refusing to load '{p}': it needs arbitrary Python objects to unpickle, which can run code "
                f"({str(exc).splitlines()[0][:200]}). If you trust the file, re-save only its tensors: "
                "torch.save(torch.load(f, weights_only=False)['state_dict'], 'clean.pth'), or use .safetensors."
            ) from None
        except Exception as exc:
            raise CheckpointError(f"Cannot read weights file '{p}': {type(exc).__name__}: {exc}") from None
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{p}' does not hold a state dict (found {type(obj).__name__}).")
    tensors = {_strip_prefix(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{p}' holds no tensors.")
    return tensors


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str]:
    """Adapt a first-conv kernel ``(O, I, *k)`` to ``in_channels`` inputs; returns (kernel, how).

    I → 1: sum over input channels (exact for a gray image copied into every channel).
    1 → N: repeat and divide by N.  I → N otherwise: tile the I kernels and scale by I / N, so the
    response to a constant image keeps its magnitude.
    """
    orig = weight.shape[1]
    if orig == in_channels:
        return weight, "unchanged"
    dtype = weight.dtype
    w = weight.float()
    if in_channels == 1:
        return w.sum(dim=1, keepdim=True).to(dtype), f"summed {orig} input-channel kernels into 1"
    repeat = -(-in_channels // orig)
    w = w.repeat(1, repeat, *([1] * (w.ndim - 2)))[:, :in_channels] * (orig / in_channels)
    return w.to(dtype), f"tiled {orig} input-channel kernels to {in_channels} and scaled by {orig}/{in_channels}"


def _locate(spec: WeightSpec) -> tuple[Path, str]:
    errors = []
    for source in spec.sources:
        try:
            return source.locate(), source.describe()
        except WeightsUnavailableError as exc:
            errors.append(str(exc))
    if not spec.sources:
        raise WeightsUnavailableError(
            f"'{spec.name}' has no pretrained weights (it is a random-initialisation entry); "
            "use --weights none, or pass --weights PATH."
        )
    raise WeightsUnavailableError(" / ".join(errors))


def _map_keys(spec: WeightSpec, ckpt: dict[str, torch.Tensor], target_full_keys: list[str]) -> dict[str, torch.Tensor]:
    if spec.key_layout == "by_order":
        if len(ckpt) != len(target_full_keys):
            raise CheckpointError(
                f"Checkpoint for '{spec.name}' has {len(ckpt)} tensors; the architecture has "
                f"{len(target_full_keys)}. Is it the right file for this backbone?"
            )
        return dict(zip(target_full_keys, ckpt.values()))
    return ckpt


def _full_keys(spec: WeightSpec) -> list[str]:
    """Parameter/buffer names of the architecture *with* its original classifier, in order."""
    import timm

    arch = spec.builder.__name__.removeprefix("timm_")
    with torch.device("meta"):
        full = timm.create_model(arch, pretrained=False)
    return ["model." + k for k in full.state_dict().keys()]


def load_backbone(spec: WeightSpec, in_channels: int, weights: str = "pretrained") -> tuple[nn.Module, LoadReport]:
    """Build ``spec``'s backbone for ``in_channels`` inputs and load ``weights`` into it.

    ``weights``: ``"pretrained"`` (the registry's sources in order), ``"none"`` (random
    initialisation, on purpose) or a file path. Returns the module and its :class:`LoadReport`.
    """
    model = spec.builder(in_channels)
    report = LoadReport(weights=spec.name if weights == "pretrained" else weights)
    target = model.state_dict()
    if weights == "none":
        report.reinitialised = [{"key": k, "why": "random initialisation requested (--weights none)"} for k in target]
        return model, report
    if weights == "pretrained":
        path, source = _locate(spec)
    else:
        path, source = Path(weights), "explicit file"
    digest = sha256_file(path)
    if weights == "pretrained" and spec.sha256 and digest != spec.sha256:
        raise CheckpointError(
            f"sha256 of '{path}' is {digest}, expected {spec.sha256} for '{spec.name}'. "
            "The file is corrupt or not the registered weights; reinstall it or pass --weights PATH."
        )
    report.source, report.file, report.sha256 = source, str(path), digest
    ckpt = read_state_dict(path)
    if spec.key_layout == "by_order" and not (set(ckpt) & set(target)):
        ckpt = _map_keys(spec, ckpt, _full_keys(spec))
    state: dict[str, torch.Tensor] = {}
    first_conv_w = f"{spec.first_conv}.weight"
    classifier_prefix = f"{spec.classifier}." if spec.classifier else None
    for key, tensor in ckpt.items():
        if classifier_prefix and key.startswith(classifier_prefix):
            report.reinitialised.append(
                {"key": key, "why": "upstream classifier removed; a new head is trained for this task"}
            )
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if key == first_conv_w and tensor.shape[1] != want[1]:
            new, how = adapt_input_conv(tensor, want[1])
            report.adapted.append({"key": key, "from": list(tensor.shape), "to": list(new.shape), "how": how})
            tensor = new
        if tensor.shape != want:
            raise CheckpointError(
                f"Tensor '{key}' has shape {tuple(tensor.shape)} in '{path}' but {tuple(want)} in "
                f"'{spec.name}'. This is not a planned adaptation; check that the file belongs to this backbone."
            )
        state[key] = tensor.to(target[key].dtype)
        if not any(a["key"] == key for a in report.adapted):
            report.loaded.append(key)
    report.missing = [k for k in target if k not in state]
    if report.unexpected or report.missing:
        raise CheckpointError(
            f"'{path}' does not fit '{spec.name}': {len(report.missing)} missing tensors "
            f"(e.g. {report.missing[:3]}), {len(report.unexpected)} unexpected (e.g. {report.unexpected[:3]})."
        )
    model.load_state_dict(state, strict=True)
    logger.info("%s", report.summary())
    return model, report
