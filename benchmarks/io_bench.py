"""IO speed: medtransfer.io.read_dicom versus plain ``pydicom.dcmread(f).pixel_array``.

Run: ``python benchmarks/io_bench.py [--reps N]``. Writes ``benchmarks/results/io.json``; ``--quick`` (3
repetitions of 0.1 s, one per decoder, written to a temp file unless ``--out``) checks the script in well
under two minutes.

* Uncompressed CT (shared/data ct_liver_seg_dicom + pydicom CT_small) and CR (the RG1 chest CR,
  decompressed and re-saved uncompressed in a temp dir): files/s of both readers, repetitions
  interleaved (order alternates), median over repetitions. read_dicom does more (float32, modality
  LUT, MONOCHROME1 inversion, metadata), so a ratio ≥ 0.9 is the target.
* Per compressed transfer syntax with a sample: files/s of the plugin medtransfer picks versus
  every other installed plugin (ratio to the slowest).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pydicom
from machine import machine
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from medtransfer.io import read_dicom
from medtransfer.io.dicom import decoder_for

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _rate(fn, files, min_time: float = 0.2) -> float:
    """files/s of ``fn`` over ``files``, looping until ``min_time`` has passed."""
    n, start = 0, time.perf_counter()
    while True:
        for f in files:
            fn(f)
        n += len(files)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return n / elapsed


def compare(named_fns: dict, files, reps: int, min_time: float) -> dict[str, float]:
    """Median files/s per function, repetitions interleaved, order reversed every other rep."""
    names = list(named_fns)
    for name in names:  # warm caches and lazy imports
        named_fns[name](files[0])
    rates: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            rates[name].append(_rate(named_fns[name], files, min_time))
    return {n: statistics.median(v) for n, v in rates.items()}


def _pydicom(f):
    return pydicom.dcmread(f).pixel_array


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--min-time", type=float, default=0.25)
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/io.json)")
    parser.add_argument("--quick", action="store_true", help="3 short repetitions: checks the script, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.min_time = 3, 0.1
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "io_quick.json" if args.quick else ROOT / "benchmarks" / "results" / "io.json"
    warnings.simplefilter("ignore")

    ct_files = sorted((DATA / "ct_liver_seg_dicom" / "ct").glob("*.dcm"))
    ct_files.append(Path(get_testdata_file("CT_small.dcm", download=False)))
    results: dict = {
        "machine": f"{machine()}, pydicom {pydicom.__version__}",
        "reps": args.reps,
        "quick": args.quick,
    }
    with tempfile.TemporaryDirectory() as tmp:
        cr_src = DATA / "dicom_nifti_io_samples" / "pydicom" / "RG1_J2KI.dcm"
        cr = pydicom.dcmread(cr_src)
        cr.decompress()
        cr_path = Path(tmp) / "RG1_uncompressed.dcm"
        cr.save_as(cr_path)
        cr_files = [cr_path]

        for label, files in (("ct", ct_files), ("cr", cr_files)):
            r = compare({"read_dicom": read_dicom, "pydicom": _pydicom}, files, args.reps, args.min_time)
            results[f"read_dicom_files_per_s_{label}"] = round(r["read_dicom"], 1)
            results[f"pydicom_files_per_s_{label}"] = round(r["pydicom"], 1)
            results[f"read_vs_pydicom_ratio_{label}"] = round(r["read_dicom"] / r["pydicom"], 3)
            results[f"{label}_files"] = [str(Path(f).name) for f in files]

    samples = {
        "RLE Lossless": [get_testdata_file("MR_small_RLE.dcm", download=False), get_testdata_file("SC_rgb_rle_16bit_2frame.dcm", download=False)],
        "JPEG 2000 Lossless": [str(DATA / "dicom_nifti_io_samples" / "pydicom" / "RG3_J2KR.dcm")],
        "JPEG 2000": [str(DATA / "dicom_nifti_io_samples" / "pydicom" / "RG1_J2KI.dcm"), get_testdata_file("693_J2KI.dcm", download=False)],
        "JPEG-LS Lossless": [get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)],
        "JPEG Baseline": [get_testdata_file("SC_rgb_jpeg.dcm", download=False)],
    }
    decoders = {}
    for syntax, files in samples.items():
        datasets = [pydicom.dcmread(f) for f in files]
        ts = str(datasets[0].file_meta.TransferSyntaxUID)
        picked, available = decoder_for(ts)
        fns = {p: (lambda ds, p=p: pixel_array(ds, decoding_plugin=p)) for p in available}
        reps = 1 if args.quick else 3 if "2000" in syntax else args.reps
        r = compare(fns, datasets, reps, args.min_time)
        slowest = min(r, key=r.get)
        decoders[syntax] = {
            "transfer_syntax": ts,
            "picked": picked,
            "files_per_s": {p: round(v, 1) for p, v in r.items()},
            "slowest": slowest,
            "picked_vs_slowest": round(r[picked] / r[slowest], 3),
        }
    results["decoders"] = decoders

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
