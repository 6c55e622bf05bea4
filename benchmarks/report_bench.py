"""Evaluation report of a large test set → benchmarks/results/report.json.

``write_classification_report`` on a TissueMNIST-sized split (47,280 test + 5,000 val images, 8
classes, macro one-vs-rest AUC with a 1,000-resample percentile bootstrap, calibration, plots,
prediction CSVs), timed with the bootstrap computed from draw counts (:class:`CountedAUC`, the
default) and with every resample built and re-sorted (the textbook way), interleaved; the two must
give the same interval. A binary set of the same size is timed the same way (AUC plus the
sensitivity / specificity intervals at the operating point).

Run: ``python benchmarks/report_bench.py [--reps 2]`` (about 4 minutes on 2 cores; run it alone).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from medtransfer.metrics import stats
from medtransfer.metrics.report import write_classification_report

RESULTS = Path(__file__).resolve().parent / "results" / "report.json"
N_TEST, N_VAL = 47_280, 5_000


def _split(rng: np.random.Generator, n: int, k: int) -> dict:
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    prob = np.exp(logits)
    prob /= prob.sum(1, keepdims=True)
    prob = prob.astype(np.float32).astype(np.float64)  # model outputs are float32: ties occur
    return {"y": y, "prob": prob, "logits": logits, "patient_ids": None,
            "paths": [f"img{i}" for i in range(n)]}


def _resampling(metric_fn, arrays, groups, n_boot, seed, counted=None):  # noqa: ANN001, ANN202
    """The bootstrap without the counted fast path: build each resample and sort it again."""
    return _ORIGINAL(metric_fn, arrays, groups, n_boot, seed)


_ORIGINAL = stats._bootstrap_values


def _time(task: str, k: int, fast: bool) -> tuple[float, dict]:
    rng = np.random.default_rng(0)
    val, test = _split(rng, N_VAL, k), _split(rng, N_TEST, k)
    names = [f"class{i}" for i in range(k)]
    stats._bootstrap_values = _ORIGINAL if fast else _resampling
    try:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            metrics = write_classification_report(out, val=val, test=test, label_names=names, task=task)
            return time.perf_counter() - t0, metrics
    finally:
        stats._bootstrap_values = _ORIGINAL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    results: dict = {"machine": f"{platform.machine()}, {platform.python_version()}", "n_test": N_TEST,
                     "n_val": N_VAL, "n_boot": 1000, "reps": args.reps}
    for task, k in (("multiclass", 8), ("binary", 2)):
        times: dict[str, list[float]] = {"counted": [], "resampling": []}
        cis = {}
        for _ in range(args.reps):
            for mode in ("counted", "resampling"):
                seconds, metrics = _time(task, k, mode == "counted")
                times[mode].append(seconds)
                cis[mode] = list(metrics["test"]["auc_ci"])
                if task == "binary":
                    op = metrics["operating_point"]["test"]
                    cis[mode] += op["sensitivity_ci"] + op["specificity_ci"]
                print(f"{task} {mode}: {seconds:.1f} s", flush=True)
        med = {m: statistics.median(v) for m, v in times.items()}
        results[task] = {
            "classes": k, "seconds": times, "median_seconds": med,
            "speedup": med["resampling"] / med["counted"],
            "same_intervals": bool(np.allclose(np.array(cis["counted"], dtype=float),
                                               np.array(cis["resampling"], dtype=float), atol=1e-12)),
            "test_auc_ci": cis["counted"][:2],
        }
        print(f"{task}: {results[task]['speedup']:.2f}x, same intervals: {results[task]['same_intervals']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
