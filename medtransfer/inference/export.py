"""Export a run's model to ONNX or TorchScript, with its preprocessing contract inside the file.

The exported graph takes the image **as the preprocessing leaves it before normalisation**: float32
``(N, C, S, S)`` (2D) or ``(N, C, S, S, S)`` (3D) in ``[0, 1]``, after the run's window and resize; the
weights' normalisation ``(x - mean) / std`` and the task's probabilities (sigmoid / softmax / ordinal
differences; an ensemble's mean over its members) are inside the graph. The batch size is free; every
other dimension is fixed. The output is ``probabilities`` ``(N, classes)``.

The contract (:func:`export_contract`) is stored as JSON: in ONNX as the ``medtransfer`` metadata
property, in TorchScript as the extra file ``medtransfer.json``. :class:`OnnxClassifier` checks an
input against it before running (onnxruntime only; no torch needed), and the TorchScript module
checks the shape itself.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtransfer.errors import ConfigError, MedTransferError
from medtransfer.run import LoadedRun, load_run

logger = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "ExportContractError", "OnnxClassifier", "export_contract", "export_run",
           "load_torchscript"]

EXPORT_FORMATS = ("onnx", "torchscript")
CONTRACT_FORMAT = "medtransfer-export/1"
METADATA_KEY = "medtransfer"
TORCHSCRIPT_EXTRA = "medtransfer.json"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
ONNX_OPSET = 17


class ExportContractError(MedTransferError, ValueError):
    """An input does not match an exported model's contract (shape, type or value range)."""


class ProbabilityGraph(nn.Module):
    """``[0, 1]`` image → normalisation → model → class probabilities, as one module to export."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], channels: int, dims: int):
        super().__init__()
        self.model = model
        m, s = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if m.numel() != channels:  # as Preprocessor.normalize: one value for all channels
            m, s = m.mean().reshape(1), s.mean().reshape(1)
        shape = (1, -1) + (1,) * dims
        self.register_buffer("mean", m.view(shape))
        self.register_buffer("std", s.view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(self.model((x - self.mean) / self.std))


class _ShapeChecked(nn.Module):
    """TorchScript wrapper refusing inputs whose non-batch dimensions differ from the contract."""

    def __init__(self, inner: nn.Module, expected: list[int], hint: str):
        super().__init__()
        self.inner, self.expected, self.hint = inner, expected, hint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        got = x.shape[1:]
        if x.dim() != len(self.expected) + 1 or [int(d) for d in got] != self.expected:
            raise RuntimeError("medtransfer: input shape " + str(list(x.shape)) + " does not match the model's "
                               "contract " + self.hint)
        return self.inner(x.float())


def _volume_grid(spec: Any) -> str:
    if spec.depth:
        return f" in-plane and {spec.depth} slices (RAS axis order), given as (depth, size, size)"
    return " in every axis (RAS axis order)" if spec.dims == 3 else ""


def export_contract(run: LoadedRun) -> dict[str, Any]:
    """The preprocessing and output contract of a run, as stored in its exported files."""
    from medtransfer._version import __version__

    spec = run.pre.spec
    shape = ["batch", spec.channels] + [spec.size] * spec.tensor_dims  # a slice encoder: (batch, depth, S, S)
    n_members = len(run.model.members) if hasattr(run.model, "members") else 1
    return {
        "format": CONTRACT_FORMAT, "backbone": run.checkpoint.get("backbone"), "task": run.model.task,
        "class_names": list(run.label_names), "operating_point": run.checkpoint.get("operating_point"),
        "ensemble_members": n_members,
        "input": {"name": INPUT_NAME, "shape": shape, "dtype": "float32", "range": [0.0, 1.0], "dims": spec.dims,
                  "size": spec.size, "channels": spec.channels, "window": spec.window,
                  "percentiles": list(spec.percentiles), "mean": list(spec.mean), "std": list(spec.std),
                  "normalization": "inside the graph: (x - mean) / std",
                  "preprocessing": "read in physical units (DICOM modality LUT, MONOCHROME1 inverted), window "
                                   f"'{spec.window}' to [0, 1], padded to a centred square and resized to "
                                   f"{spec.size} px" + _volume_grid(spec)},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(run.label_names)],
                   "meaning": _output_meaning(run.model.task)},
        "medtransfer_version": __version__, "torch_version": str(torch.__version__),
    }


def _output_meaning(task: str) -> str:
    return {"binary": "[P(class 0), P(class 1)]; positive if P(class 1) >= operating_point.threshold",
            "multiclass": "softmax probabilities over class_names",
            "multilabel": "one independent sigmoid probability per class name",
            "ordinal": "class probabilities from cumulative logits; the prediction is the median grade"}.get(
        task, "the model's output")


def _example(contract: dict[str, Any], batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, *contract["input"]["shape"][1:], generator=torch.Generator().manual_seed(0))


def export_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str = "onnx") -> Path:
    """Export the model of ``run_dir`` to ``out`` as ``onnx`` or ``torchscript`` (see the module docstring);
    the file is written atomically and checked against PyTorch on a random batch. Returns ``out``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"Unknown export format '{fmt}'; choose {' or '.join(EXPORT_FORMATS)}.")
    run = load_run(run_dir, "cpu")
    contract = export_contract(run)
    spec = run.pre.spec
    graph = ProbabilityGraph(run.model.float().eval(), list(spec.mean), list(spec.std), spec.channels,
                             spec.tensor_dims).eval()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        (_write_onnx if fmt == "onnx" else _write_torchscript)(graph, contract, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("exported %s (%s, %d member(s)) -> %s", run_dir, fmt, contract["ensemble_members"], target)
    return target


def _write_onnx(graph: nn.Module, contract: dict[str, Any], path: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise MedTransferError('ONNX export needs onnx and onnxruntime: pip install "medtransfer[export]"') from None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(graph, (_example(contract),), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(contract)
    model.doc_string = f"medtransfer export of {contract['backbone']} ({contract['task']}); contract in metadata"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_torchscript(graph: nn.Module, contract: dict[str, Any], path: Path) -> None:
    example = _example(contract)
    shape = contract["input"]["shape"]
    hint = f"(N, {', '.join(str(d) for d in shape[1:])}) float32 in [0, 1]"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # TorchScript deprecation
        traced = torch.jit.trace(graph, (example,), check_inputs=[(_example(contract, 3),)])
        scripted = torch.jit.script(_ShapeChecked(traced, [int(d) for d in shape[1:]], hint))
        torch.jit.save(scripted, str(path), _extra_files={TORCHSCRIPT_EXTRA: json.dumps(contract)})


def load_torchscript(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """An exported TorchScript file and its contract."""
    extra = {TORCHSCRIPT_EXTRA: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module.eval(), json.loads(extra[TORCHSCRIPT_EXTRA])


class OnnxClassifier:
    """An exported ONNX model with onnxruntime, checking each input against the file's contract."""

    def __init__(self, path: str | os.PathLike[str], providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MedTransferError('Running ONNX exports needs onnxruntime: pip install "medtransfer[export]"') from None
        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ExportContractError(f"{path} holds no medtransfer contract (metadata '{METADATA_KEY}'); "
                                      "export it with 'medtransfer export'.")
        self.contract: dict[str, Any] = json.loads(meta[METADATA_KEY])
        self.class_names: list[str] = list(self.contract["class_names"])

    def check(self, x: np.ndarray) -> np.ndarray:
        """``x`` as float32 if it fits the contract; :class:`ExportContractError` saying what differs otherwise."""
        spec = self.contract["input"]
        expected = tuple(spec["shape"][1:])
        want = f"(N, {', '.join(map(str, expected))}) in [0, 1]"
        x = np.asarray(x)
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ExportContractError(
                f"Input of shape {tuple(x.shape)} does not match the model's contract {want}: "
                f"{spec['channels']} channel(s), {spec['size']} px per side ({spec['dims']}D), after the "
                f"'{spec['window']}' window; add the batch axis for a single image.")
        if not np.issubdtype(x.dtype, np.floating):
            raise ExportContractError(f"Input dtype {x.dtype} is not floating point; the contract is {want}.")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ExportContractError(f"Input values span [{lo:.3g}, {hi:.3g}], outside the contract's [0, 1]: "
                                      "pass the windowed image before normalisation (mean/std are in the graph).")
        return x.astype(np.float32, copy=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, classes)`` for a batch that fits the contract."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: self.check(x)})[0]
