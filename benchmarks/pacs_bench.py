"""From a PACS to result rows: instances/s over DICOMweb and DIMSE against ``predict`` on the same
files in a local folder, measured side by side in one run, and the time to send the results back.

A real Orthanc (with its DICOMweb plugin) is started on loopback ports, as the tests start it, and
loaded with copies of the brain MR studies in ``../shared/data`` (new UIDs per copy: 195 instances
per copy, 7 series in 3 studies). Then, with the same model and the same settings:

* ``folder``: ``predict`` over the files on local disk;
* ``dicomweb``: QIDO-RS, WADO-RS (a series per request, streamed to the spool), predict, SR per study
  written to disk; ``dicomweb_rows_only``: the same without building the SR reports (retrieval alone);
* ``dimse_get`` / ``dimse_move``: C-FIND, C-GET on the same association / C-MOVE to our own SCP;
* ``send``: the SR objects of the DICOMweb run stored back by STOW-RS and by C-STORE.

Every PACS run must give the folder's rows (same probabilities); the overhead is
``folder rate / PACS rate - 1`` (goal: at most 20 %), on the time to the complete table; the SR
reports, built beside the job as its studies complete, are timed apart (``report_build_s``), as is
sending them back. The CPU seconds of this process and of Orthanc (which shares the two cores here; in a
hospital it runs on its own machine) are recorded per mode. The model is EfficientNet-Lite0 with its
ImageNet weights at the xray preset's 128 px (``--quick``: the tiny test CNN at 32 px on one copy).

Usage: ``python benchmarks/pacs_bench.py [--copies 10] [--reps 2] [--quick]``; writes
``benchmarks/results/pacs.json`` (``pacs_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc launcher the tests use

from machine import cpu_model  # noqa: E402
from orthanc_server import OrthancServer, find_orthanc  # noqa: E402

SHARED = Path(os.environ.get("MEDTRANSFER_SHARED_DATA", ROOT.parent / "shared" / "data"))


def make_copies(src: Path, dst: Path, copies: int) -> list[Path]:
    """``copies`` copies of every DICOM file under ``src`` with new, consistent Study/Series/SOP UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(src.rglob("*.dcm"))
    out = []
    for c in range(copies):
        for f in files:
            ds = pydicom.dcmread(f)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                setattr(ds, keyword, generate_uid(entropy_srcs=[str(c), str(getattr(ds, keyword))]))
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            target = dst / f"copy{c:03d}" / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target)
            out.append(target)
    return out


def make_run(path: Path, quick: bool) -> Path:
    """A run directory: the xray preset's EfficientNet-Lite0 (ImageNet weights, 128 px), or the tiny CNN."""
    from medtransfer.backbones import get_weight_spec, load_backbone
    from medtransfer.config import load_config
    from medtransfer.data.preprocess import preprocess_spec
    from medtransfer.run import RunDirectory
    from medtransfer.run.checkpoint import model_payload
    from medtransfer.transfer import TransferModel

    overrides = ["model.backbone=tiny_cnn.random", "data.size=32"] if quick else []
    cfg = load_config("xray", overrides=overrides)
    spec_w = get_weight_spec(cfg.model.backbone)
    backbone, _ = load_backbone(spec_w, 1, "none" if quick else "pretrained")
    spec = preprocess_spec(cfg.data, 1, spec_w.mean, spec_w.std)
    path.mkdir(parents=True, exist_ok=True)
    RunDirectory(path).save_model(model_payload(TransferModel(backbone, 2), cfg.to_dict(), spec.to_dict(),
                                                ["no_finding", "finding"], cfg.model.backbone,
                                                operating_point={"threshold": 0.5}))
    return path


def _probabilities(csv_path: Path) -> dict[str, float]:
    with open(csv_path, newline="") as fh:
        return {r["sop_instance_uid"]: float(r["prob_finding"]) for r in csv.DictReader(fh) if r["status"] == "ok"}


def max_difference(a: dict[str, float], b: dict[str, float]) -> float | None:
    """The largest probability difference over the same instances (None: not the same instances).
    Batches are composed differently (chunks), so float kernels may differ in the last digits."""
    if a.keys() != b.keys():
        return None
    return max(abs(a[k] - b[k]) for k in a)


def time_folder(run_dir: Path, folder: Path, out: Path, batch_size: int) -> tuple[float, float, float]:
    from medtransfer.inference import predict_folder

    start = time.perf_counter()
    predict_folder(run_dir, folder, out, batch_size=batch_size, device="cpu")
    elapsed = time.perf_counter() - start
    return elapsed, 0.0, elapsed


REPORT_SECONDS: list[float] = []
ROWS_DONE: list[float] = []
BUILD_REPORTS = [True]  # False: the "rows only" modes, where the SR reports are not built (retrieval alone)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process so far (this one and its ended children, such as the report
    process, when ``pid`` is None; Linux /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _instrument() -> None:
    """Record when a job's table is complete and how long its SR reports take (they are built and
    sent by a writer thread beside the job, so the job's end is the later of the two)."""
    from medtransfer.hospital.reports import ReportBook
    from medtransfer.hospital.rows import RowLog

    write, close = ReportBook._write, RowLog.__exit__

    def timed_write(self, *args):
        if not BUILD_REPORTS[0]:
            return None
        start = time.perf_counter()
        try:
            return write(self, *args)
        finally:
            REPORT_SECONDS.append(time.perf_counter() - start)

    def timed_close(self, *args):
        close(self, *args)
        ROWS_DONE.append(time.perf_counter())

    ReportBook._write, RowLog.__exit__ = timed_write, timed_close


def time_pacs(run_dir: Path, url: str, out: Path, batch_size: int, chunk: int,
              extra: list[str], reports: bool = True) -> tuple[float, float, float]:
    """``(seconds to the complete table, seconds of SR reports written beside it, seconds of the whole
    job)`` of one PACS job (``reports=False``: the reports are not built)."""
    from medtransfer.hospital import PacsJobOptions, load_settings, predict_from_pacs
    from medtransfer.inference.batch import PredictOptions

    settings = load_settings(None, [f"chunk_size={chunk}", *extra])
    REPORT_SECONDS.clear()
    ROWS_DONE.clear()
    start = time.perf_counter()
    options = PacsJobOptions(PredictOptions(batch_size=batch_size), chunk_size=chunk)
    BUILD_REPORTS[0] = reports
    try:
        summary = predict_from_pacs(run_dir, url, out, settings, options, device="cpu")
    finally:
        BUILD_REPORTS[0] = True
    total = time.perf_counter() - start
    assert summary.counts.get("error", 0) == 0, summary.counts
    return ROWS_DONE[-1] - start, sum(REPORT_SECONDS), total


def time_send(pacs, files: list[Path]) -> float:
    start = time.perf_counter()
    failed = pacs.store(files)
    elapsed = time.perf_counter() - start
    assert not failed, failed
    return elapsed


def measure(args, work: Path) -> dict:
    import torch

    from medtransfer.hospital import ConnectionSettings, open_pacs

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    files = make_copies(SHARED / "brain_mr_dicom_studies", work / "folder", args.copies)
    run_dir = make_run(work / "run", args.quick)
    move_port = __import__("orthanc_server").free_port()
    with OrthancServer(work / "orthanc", {"MEDTRANSFER": move_port}) as pacs:
        t = time.perf_counter()
        pacs.upload(files)
        upload_s = time.perf_counter() - t
        mr = "?Modality=MR"
        modes = {
            "folder": lambda i: time_folder(run_dir, work / "folder", work / f"folder{i}.csv", args.batch_size),
            "dicomweb": lambda i: time_pacs(run_dir, pacs.dicomweb + mr, work / f"dicomweb{i}.csv", args.batch_size,
                                            args.chunk, []),
            "dicomweb_rows_only": lambda i: time_pacs(run_dir, pacs.dicomweb + mr, work / f"dicomweb_rows_only{i}.csv",
                                                      args.batch_size, args.chunk, [], reports=False),
            "dimse_get": lambda i: time_pacs(run_dir, pacs.dimse + mr, work / f"dimse_get{i}.csv", args.batch_size,
                                             args.chunk, []),
            "dimse_move": lambda i: time_pacs(run_dir, pacs.dimse + mr, work / f"dimse_move{i}.csv", args.batch_size,
                                              args.chunk, ["retrieve=move", f"move_port={move_port}",
                                                           "move_bind=127.0.0.1"]),
        }
        _instrument()
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        report_s: dict[str, list[float]] = {m: [] for m in modes}
        job_s: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}  # (ours, Orthanc's) per run
        for i in range(args.reps):  # interleaved, so that a busy moment hits every mode alike
            for mode, run in modes.items():
                ours, theirs = cpu_seconds(), cpu_seconds(pacs.proc.pid)
                rows_s, sr_s, total_s = run(i)
                cpu[mode].append((cpu_seconds() - ours, cpu_seconds(pacs.proc.pid) - theirs))
                seconds[mode].append(rows_s)
                report_s[mode].append(sr_s)
                job_s[mode].append(total_s)
        reference = _probabilities(work / "folder0.csv")
        same_rows = {m: max_difference(_probabilities(work / f"{m}0.csv"), reference) for m in modes if m != "folder"}
        reports = sorted((work / "dicomweb0-results").glob("*.sr.dcm"))
        send = {"stow_rs": time_send(open_pacs(pacs.dicomweb, ConnectionSettings()), reports),
                "c_store": time_send(open_pacs(pacs.dimse, ConnectionSettings()), reports)}
    n = len(files)
    best = {m: min(s) for m, s in seconds.items()}
    rate = {m: n / s for m, s in best.items()}
    return {
        "instances": n, "studies": 3 * args.copies, "reports": len(reports), "upload_s": round(upload_s, 2),
        "model": "tiny_cnn.random 32 px" if args.quick else "efficientnet_lite0.in1k 128 px",
        "batch_size": args.batch_size, "chunk_size": args.chunk, "reps": args.reps,
        "seconds": {m: [round(x, 3) for x in s] for m, s in seconds.items()},
        "instances_per_s": {m: round(r, 1) for m, r in rate.items()},
        "overhead_vs_folder": {m: round(best[m] / best["folder"] - 1, 3) for m in modes if m != "folder"},
        "median_overhead_vs_folder": {m: round(statistics.median(seconds[m]) / statistics.median(seconds["folder"]) - 1, 3)
                                      for m in modes if m != "folder"},
        "max_probability_difference_to_folder": same_rows,
        "job_seconds_with_reports": {m: round(min(s), 3) for m, s in job_s.items()},
        "report_build_s": {m: round(min(s), 3) for m, s in report_s.items() if m not in ("folder", "dicomweb_rows_only")},
        "cpu_seconds_medtransfer": {m: round(statistics.median(c[0] for c in v), 2) for m, v in cpu.items()},
        "cpu_seconds_orthanc": {m: round(statistics.median(c[1] for c in v), 2) for m, v in cpu.items()},
        "report_build_ms_per_instance": round(1000 * min(report_s["dicomweb"]) / n, 2),
        "send_results_s": {k: round(v, 3) for k, v in send.items()},
        "send_per_report_ms": {k: round(1000 * v / max(1, len(reports)), 1) for k, v in send.items()},
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="copies of the 195 brain MR instances (default 10)")
    parser.add_argument("--reps", type=int, default=2, help="runs of every mode, interleaved; the best is reported")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=64, help="instances retrieved per chunk")
    parser.add_argument("--quick", action="store_true", help="tiny CNN at 32 px, one copy, one rep (< 2 min)")
    args = parser.parse_args()
    if args.quick:
        args.copies, args.reps = 1, 1
    if find_orthanc()[0] is None:
        sys.exit(f"pacs_bench: {find_orthanc()[2]}")
    if not (SHARED / "brain_mr_dicom_studies").is_dir():
        sys.exit(f"pacs_bench: {SHARED / 'brain_mr_dicom_studies'} not found (set MEDTRANSFER_SHARED_DATA)")
    os.environ.setdefault("MEDTRANSFER_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-"))
    try:
        result = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks" / "results" / ("pacs_quick.json" if args.quick else "pacs.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
