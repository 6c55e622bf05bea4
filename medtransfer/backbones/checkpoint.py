"""Reading checkpoint files safely and mapping upstream key layouts onto the builders' names.

Pickle checkpoints are read with ``torch.load(weights_only=True)``. Files that pickle a whole
``nn.Module`` (torchxrayvision's ``.pt`` files, legacy format) are read by a restricted unpickler
that allows only torch's weights-only globals plus inert stand-ins for ``torch.nn`` /
``torchxrayvision`` module classes: no class from the file is imported or run, only tensors come
out. Anything else that needs arbitrary pickle is refused.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medtransfer.errors import MedTransferError, WeightsUnavailableError

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")
# Modules whose classes may appear in a pickled whole-model checkpoint; they are replaced by stubs.
_MODULE_PICKLE_PREFIXES = ("torch.nn.modules.", "torchxrayvision.", "torchvision.models.")


class CheckpointError(MedTransferError):
    """A checkpoint cannot be loaded safely or does not fit the network."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's contents (names, dtypes, shapes and bytes, in name order), independent
    of the file format that holds it."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sha256_matches(digest: str, expected: str) -> bool:
    """Full digest or a registered prefix of at least 8 hex digits (torchvision names carry one)."""
    expected = expected.lower()
    return len(expected) >= 8 and digest.lower().startswith(expected)


def strip_prefix(key: str) -> str:
    """Remove leading ``module.`` / ``_orig_mod.`` (DataParallel, torch.compile), never inner ones."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                changed = True
    return key


# ---------------------------------------------------------------------------------------------
# Whole-module pickles (torchxrayvision)


class _StubModule:
    """Inert stand-in for a pickled ``nn.Module`` class: keeps its ``__dict__``, runs nothing."""

    _stub_path = "?"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0] or {}
        if isinstance(state, dict):
            self.__dict__.update(state)


def _stub_for(path: str) -> type:
    return type("Stub_" + path.replace(".", "_"), (_StubModule,), {"_stub_path": path})


def _pickle_globals(path: Path) -> set[str]:
    """All ``module.name`` globals a torch checkpoint's pickle refers to, found without running it."""
    with open(path, "rb") as fh:
        data = fh.read()
    streams: list[io.BytesIO] = []
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            streams = [io.BytesIO(zf.read(n)) for n in zf.namelist() if n.endswith("data.pkl")]
    else:  # legacy format: magic, protocol, sys_info, then the object, in a row
        stream = io.BytesIO(data)
        for _ in range(4):
            start = stream.tell()
            try:
                for _op in pickletools.genops(stream):
                    pass
            except Exception:
                break
            streams.append(io.BytesIO(data[start:stream.tell()]))
    found: set[str] = set()
    for s in streams:
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(s):
                if op.name in ("GLOBAL", "INST"):
                    found.add(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:
            continue
    return found


def _module_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``state_dict()`` of a tree of stub modules: parameters and persistent buffers."""
    out: dict[str, torch.Tensor] = {}
    d = getattr(obj, "__dict__", {})
    non_persistent = d.get("_non_persistent_buffers_set") or set()
    for k, v in (d.get("_parameters") or {}).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v.detach()
    for k, v in (d.get("_buffers") or {}).items():
        if isinstance(v, torch.Tensor) and k not in non_persistent:
            out[prefix + k] = v
    for k, m in (d.get("_modules") or {}).items():
        if m is not None:
            out.update(_module_tensors(m, f"{prefix}{k}."))
    return out


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch's weights-only globals, plus inert stubs for ``nn.Module`` classes."""

    def find_class(self, module: str, name: str) -> Any:
        full = f"builtins.{name}" if module == "__builtin__" else f"{module}.{name}"
        from torch import _weights_only_unpickler as wou

        allowed = wou._get_allowed_globals()
        if full in allowed:
            return allowed[full]
        if full.startswith(_MODULE_PICKLE_PREFIXES):
            return _stub_for(full)
        raise pickle.UnpicklingError(f"global '{full}' is not allowed")


class _RestrictedPickleModule:
    """``pickle_module`` for ``torch.load``: legacy whole-module files (with their ``module``
    persistent ids) cannot go through ``weights_only``; this unpickler is as strict about globals."""

    __name__ = "medtransfer_restricted_pickle"
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(f, **kwargs).load()


def _is_default_safe(name: str) -> bool:
    from torch import _weights_only_unpickler as wou

    if name.startswith("__builtin__."):  # protocol-2 pickles use the Python 2 module name
        name = "builtins." + name.split(".", 1)[1]
    return name in wou._get_allowed_globals() or name.startswith(("torch._utils.", "collections.OrderedDict"))


def _load_module_pickle(path: Path, first_error: str) -> Any:
    """Load a pickled whole ``nn.Module`` (torchxrayvision) as inert stubs; refuse anything else."""
    names = _pickle_globals(path)
    unsafe = sorted(n for n in names if not n.startswith(_MODULE_PICKLE_PREFIXES) and not _is_default_safe(n))
    if unsafe or not any(n.startswith(_MODULE_PICKLE_PREFIXES) for n in names):
        raise CheckpointError(
            f"Refusing to load '{path}': it needs arbitrary Python objects to unpickle, which can run code "
            f"({first_error}; globals outside the allowed tensor and nn.Module types: {unsafe[:5]}). "
            "If you trust the file, re-save only its tensors in a trusted Python session: "
            "torch.save(torch.load(f, weights_only=False)['state_dict'], 'clean.pth'), or use .safetensors."
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"Refusing to load '{path}': {exc}. Re-save its tensors as .safetensors.") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file into a flat ``{name: tensor}`` dict, safely.

    Pickle checkpoints are read with ``weights_only=True``; one that needs arbitrary code to
    unpickle is refused. Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped,
    pickled whole modules (torchxrayvision) are reduced to their state dict, and ``module.`` /
    ``_orig_mod.`` removed where they are prefixes (never inside a name).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsUnavailableError(f"Weights file '{p}' does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p))
        except Exception as exc:
            raise CheckpointError(f"Cannot read safetensors file '{p}': {type(exc).__name__}: {exc}") from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler error" in ln]
            obj = _load_module_pickle(p, (lines or [str(exc).splitlines()[0]])[0][:200])
        except Exception as exc:
            raise CheckpointError(f"Cannot read weights file '{p}': {type(exc).__name__}: {exc}") from None
    if isinstance(obj, _StubModule):
        obj = _module_tensors(obj)
    for _ in range(3):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict | _StubModule)), None)
            if inner is None:
                break
            obj = _module_tensors(inner) if isinstance(inner, _StubModule) else inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{p}' does not hold a state dict (found {type(obj).__name__}).")
    tensors = {strip_prefix(str(k)): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{p}' holds no tensors.")
    return tensors


# ---------------------------------------------------------------------------------------------
# Upstream key layouts → builder names

_TV_DENSE_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_RESNET_CHILDREN = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_DENSENET_CHILDREN = (
    "conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1", "denseblock2", "transition2",
    "denseblock3", "transition3", "denseblock4", "norm5",
)


def _layout_same(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return ckpt


def _layout_timm(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm hub files name tensors as the bare timm model; the builder keeps it under ``model.``."""
    return {k if k.startswith("model.") else f"model.{k}": v for k, v in ckpt.items()}


def _layout_torchvision_densenet(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's published DenseNet files use ``norm.1`` for ``norm1`` (see torchvision)."""
    out = {}
    for k, v in ckpt.items():
        m = _TV_DENSE_OLD.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _layout_radimagenet_resnet(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RadImageNet's PyTorch files: ``nn.Sequential(*list(resnet50.children())[:9])`` as ``backbone``."""
    out = {}
    for k, v in ckpt.items():
        m = re.match(r"^backbone\.(\d+)\.(.*)$", k)
        if m and int(m.group(1)) < len(_RESNET_CHILDREN):
            k = f"{_RESNET_CHILDREN[int(m.group(1))]}.{m.group(2)}"
        out[k] = v
    return out


def _layout_radimagenet_densenet(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RadImageNet DenseNet-121: ``backbone.0.<features child>`` or ``backbone.<i>.`` over ``features``."""
    out = {}
    for k, v in ckpt.items():
        m = re.match(r"^backbone\.(\d+)\.(.*)$", k)
        if m:
            rest = m.group(2)
            if m.group(1) == "0" and rest.split(".")[0] in _DENSENET_CHILDREN:
                k = f"features.{rest}"
            elif int(m.group(1)) < len(_DENSENET_CHILDREN):
                k = f"features.{_DENSENET_CHILDREN[int(m.group(1))]}.{rest}"
        out[k] = v
    return _layout_torchvision_densenet(out)


# Where the I3ResNet sits in upstream files: Astra's whole report model, Merlin's CLIP model, the encoder alone.
MERLIN_PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.", "i3_resnet.")


def _layout_merlin_i3resnet(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merlin / Astra files: the encoder's tensors lose their prefix; every other tensor of the upstream
    model (text encoder, language model) goes under ``upstream_only.`` so the loader lists it as discarded."""
    if not any(k.startswith(MERLIN_PREFIXES) for k in ckpt):
        return ckpt
    out = {}
    for k, v in ckpt.items():
        prefix = next((p for p in MERLIN_PREFIXES if k.startswith(p)), None)
        out[k[len(prefix):] if prefix else f"upstream_only.{k}"] = v
    return out


KEY_LAYOUTS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "same": _layout_same,
    "timm": _layout_timm,
    "torchvision_densenet": _layout_torchvision_densenet,
    "radimagenet_resnet": _layout_radimagenet_resnet,
    "radimagenet_densenet": _layout_radimagenet_densenet,
    "merlin_i3resnet": _layout_merlin_i3resnet,
}
"""Named key mappings a :class:`WeightSpec` can declare (``by_order`` is handled by the loader)."""
