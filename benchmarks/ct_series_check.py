"""The Merlin CT encoder on a real CT series: preprocessing checked against the input contract, one
forward pass on the full 224 × 224 × 160 grid (seconds on this CPU), and which HU window the weights'
first BatchNorm expects.

Input: a DICOM CT series (default: the shared 3-slice abdominal series ``ct_liver_seg_dicom/ct``),
read in HU by ``medtransfer.io.read_series``; ``medtransfer.data.ct.preprocess_ct`` brings it to the
contract (RAS, 1.5 × 1.5 × 3 mm, HU window, 224 × 224 × 160). Writes
``benchmarks/results/ct_series_check.json``; exits 1 when the preprocessed volume breaks the contract.

Usage: ``python benchmarks/ct_series_check.py [--series DIR] [--no-forward]`` (about 30 s on 2 cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medtransfer.backbones import check_input_contract, get_weight_spec, load_backbone
from medtransfer.backbones.i3resnet import stem_statistics_fit
from medtransfer.data.ct import preprocess_ct
from medtransfer.io import read_series

ROOT = Path(__file__).resolve().parents[1]
SERIES = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data")) / "ct_liver_seg_dicom" / "ct"
ENCODER = "i3resnet152.merlin_astra"
WINDOWS = ((-1000.0, 200.0), (-1000.0, 1000.0), (-1000.0, 400.0), (-160.0, 240.0))


def contract_problems(out: np.ndarray, rep: dict, spec) -> list[str]:
    """What in the preprocessed volume differs from the weights' contract (empty: none)."""
    ct = spec.ct
    problems = []
    if rep["orientation_out"] != ct.orientation:
        problems.append(f"orientation {rep['orientation_out']} != {ct.orientation}")
    if not np.allclose(rep["spacing_out_mm"], ct.spacing_mm, atol=1e-3):
        problems.append(f"spacing {rep['spacing_out_mm']} != {list(ct.spacing_mm)}")
    if list(out.shape) != list(ct.size):
        problems.append(f"grid {list(out.shape)} != {list(ct.size)}")
    if out.min() < 0 or out.max() > 1:
        problems.append(f"values [{out.min():.3g}, {out.max():.3g}] outside [0, 1]")
    try:
        check_input_contract(torch.from_numpy(out)[None, None], spec)
    except Exception as exc:  # the contract check says why
        problems.append(str(exc))
    return problems


def window_fits(volume, spec) -> dict[str, dict]:
    """``stem_statistics_fit`` of the series under each candidate HU window (slices kept at their spacing)."""
    model, _ = load_backbone(spec, 1, stages=1)
    fits = {}
    for window in WINDOWS:
        prep = dataclasses.replace(spec.ct, hu_window=window, spacing_mm=(*spec.ct.spacing_mm[:2], volume.spacing[2]))
        out, _ = preprocess_ct(volume, prep, size=(*spec.ct.size[:2], volume.array.shape[2]))
        fits[f"{window[0]:g}..{window[1]:g}"] = {k: round(v, 4) for k, v in
                                                   stem_statistics_fit(model.eval(), torch.from_numpy(out)[None, None]).items()}
    return fits


def forward(out: np.ndarray, spec) -> dict:
    model, _ = load_backbone(spec, 1)
    x = torch.from_numpy(out)[None, None]
    with torch.inference_mode():
        t0 = time.perf_counter()
        fmap = model.eval().forward_upstream(x)
        seconds = time.perf_counter() - t0
    return {"layer4_shape": list(fmap.shape), "seconds": round(seconds, 2), "threads": torch.get_num_threads(),
            "pooled_mean": round(float(fmap.mean()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=SERIES, help="folder of one DICOM CT series")
    ap.add_argument("--no-forward", action="store_true", help="skip the full-grid forward pass")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ct_series_check.json")
    args = ap.parse_args()
    spec = get_weight_spec(ENCODER)
    volume = read_series(args.series)
    out, rep = preprocess_ct(volume, spec.ct)
    result = {"series": str(args.series), "modality": volume.meta.get("modality"), "preprocessing": rep,
              "contract": spec.ct.to_dict(), "problems": contract_problems(out, rep, spec),
              "window_fits": window_fits(volume, spec)}
    if not args.no_forward:
        result["forward"] = forward(out, spec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "contract"}, indent=1))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
