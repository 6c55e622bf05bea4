"""The files a Hugging Face model folder ships beside its weights: ``config.json`` (the architecture)
and ``preprocessor_config.json`` (the input contract: mean, std, size).

A registry entry may record what they must say (``WeightSpec.extra["hf_config"]`` and
``["hf_preprocessor"]``). When a weights file has them beside it (a Hub snapshot folder, or a copy
of one), they are compared with the entry before any tensor is read: a checkpoint of another
architecture, or a preprocessing the registry would not apply, is refused with what differs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medtransfer.backbones.checkpoint import CheckpointError
from medtransfer.backbones.registry import WeightSpec

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"


def _same(expected: Any, found: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(found, dict) and all(_same(v, found.get(k)) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(found, list) and len(found) == len(expected) and all(map(_same, expected, found))
    if isinstance(expected, float) or isinstance(found, float):
        return isinstance(found, (int, float)) and math.isclose(float(expected), float(found), rel_tol=1e-4)
    return expected == found


def _differences(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    return [f"{k}: {found.get(k, 'absent')!r} (the registry expects {v!r})"
            for k, v in expected.items() if not _same(v, found.get(k))]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read '{path}' ({type(exc).__name__}: {exc}); it must be the JSON file the "
                              "model's repository ships.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' does not hold a JSON object.")
    return data


def check_sidecar_files(spec: WeightSpec, weights_file: str | Path) -> list[str]:
    """Compare ``config.json`` / ``preprocessor_config.json`` beside ``weights_file`` with ``spec``;
    returns what was checked (empty when the entry records neither or the files are absent)."""
    folder = Path(weights_file).parent
    checked = []
    for filename, key, what in ((CONFIG, "hf_config", "architecture"),
                                (PREPROCESSOR, "hf_preprocessor", "input contract")):
        expected = spec.extra.get(key)
        path = folder / filename
        if not expected or not path.is_file():
            continue
        diff = _differences(expected, _read(path))
        if diff:
            raise CheckpointError(
                f"'{path}' does not describe '{spec.name}' ({what}): {'; '.join(diff)}. The weights beside it "
                f"belong to another model or were changed; use the files of the model's own repository, or pass "
                f"--weights with a registry entry that matches them."
            )
        checked.append(f"{filename}: {what} matches the registry ({', '.join(expected)})")
    return checked
