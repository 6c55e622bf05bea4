"""The Ray engine against the local streaming engine, measured side by side in one run.

On folders of synthetic chest-radiograph DICOM files (the demo generator's images, copied to reach
the sizes below) with EfficientNet-Lite0 at the xray preset's 128 px (``--quick``: a tiny CNN at
32 px and smaller folders), each ``medtransfer predict`` run as a fresh command, the way a user runs it:

* throughput on the same files: the local engine (``--workers``) and the Ray engine on one node
  holding all the machine's cores (one actor), on a cluster already running; their ratio;
* peak RSS of the Ray driver process at the small and the large folder (should be flat);
* scaling: one node with one CPU and one actor against two such nodes with one actor each.

Every Ray node is started on this machine by :class:`tests.ray_cluster.LocalRayCluster` (own temp
dir, ports and session; stopped by process id). On one machine Ray adds work (worker processes,
serialising decoded tensors through the object store, one torch thread per actor CPU) and two local
nodes share the same cores, so the ratio measures the engine's overhead, not a speed-up.

Usage: ``python benchmarks/ray_bench.py [--files 500] [--large 5000] [--reps 2]`` (idle machine),
``python benchmarks/ray_bench.py --quick`` (under two minutes; checks the script, writes nothing);
writes ``benchmarks/results/ray.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from ray_cluster import CLUSTER_ENV, LocalRayCluster  # noqa: E402

from inference_bench import make_folder, make_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def tiny_run(path: Path) -> Path:
    """A run directory with an untrained tiny CNN at 32 px (``--quick``: plumbing, not model cost)."""
    import torch

    from medtransfer.backbones import get_weight_spec, load_backbone
    from medtransfer.config import load_config
    from medtransfer.data.preprocess import PreprocessSpec
    from medtransfer.run import RunDirectory
    from medtransfer.run.checkpoint import model_payload
    from medtransfer.transfer import TransferModel

    torch.manual_seed(0)
    cfg = load_config("xray", overrides=["model.backbone=tiny_cnn.random", "model.weights=none", "data.size=32"])
    model = TransferModel(load_backbone(get_weight_spec("tiny_cnn.random"), 1, "none")[0], 2)
    spec = PreprocessSpec(32, 1, "tags", (0.5, 99.5), (0.5,), (0.5,), 2)
    path.mkdir(parents=True)
    RunDirectory(path).save_model(model_payload(model, cfg.to_dict(), spec.to_dict(), ["no_finding", "opacity"],
                                                "tiny_cnn.random", operating_point={"threshold": 0.5}))
    return path


def timed_predict(run_dir: Path, folder: Path, out: Path, extra: list[str]) -> dict:
    """One ``medtransfer predict`` as a fresh process: wall seconds, files/s, the process's peak RSS."""
    env = {**os.environ, **CLUSTER_ENV}
    args = [sys.executable, "-m", "medtransfer", "predict", str(run_dir), str(folder), "--out", str(out), "-q", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (the driver spawns no process)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{err[-3000:]}")
    n = sum(1 for _ in open(out)) - 1
    ray_line = next((line for line in err.splitlines() if line.startswith("ray: ")), "")
    return {"files": n, "seconds": round(seconds, 2), "files_per_s": round(n / seconds, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "engine_report": ray_line}


def ray_args(cluster: LocalRayCluster, actors: int, cpus_per_actor: float, batch_size: int) -> list[str]:
    return ["--engine", "ray", "--address", cluster.address, "--actors", str(actors),
            "--cpus-per-actor", str(cpus_per_actor), "--batch-size", str(batch_size)]


def warm_up(cluster: LocalRayCluster, run_dir: Path, tmp: Path, args, actors: int, cpus_per_actor: float) -> None:
    """One untimed job: the first job on a cluster also starts Ray Data's own cluster-wide actors."""
    if args.warmup is not None:
        timed_predict(run_dir, args.warmup, tmp / f"warmup{len(cluster.nodes)}.csv",
                      ray_args(cluster, actors, cpus_per_actor, args.batch_size))


def local_vs_ray(run_dir, small, large, tmp, args) -> dict:
    """One node with all cores against the local engine (interleaved reps), then the driver at the large folder."""
    local, ray = [], []
    with LocalRayCluster(object_store_mb=args.object_store_mb) as cluster:
        cluster.add_node(num_cpus=os.cpu_count() or 2)
        warm_up(cluster, run_dir, tmp, args, 1, 1)
        for rep in range(args.reps):
            local.append(timed_predict(run_dir, small, tmp / f"local{rep}.csv",
                                       ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]))
            ray.append(timed_predict(run_dir, small, tmp / f"ray{rep}.csv", ray_args(cluster, 1, 1, args.batch_size)))
            print(f"rep {rep}: local {local[-1]['files_per_s']}/s, ray {ray[-1]['files_per_s']}/s "
                  f"(driver {ray[-1]['peak_rss_mb']} MB)", flush=True)
        big = timed_predict(run_dir, large, tmp / "ray_large.csv", ray_args(cluster, 1, 1, args.batch_size))
        print(f"large: ray {big['files_per_s']}/s, driver {big['peak_rss_mb']} MB", flush=True)
    local_rate = statistics.median(r["files_per_s"] for r in local)
    ray_rate = statistics.median(r["files_per_s"] for r in ray)
    return {"local": local, "ray_one_node": ray, "ray_one_node_large": big,
            "local_files_per_s": local_rate, "ray_files_per_s": ray_rate, "ray_vs_local": round(ray_rate / local_rate, 3),
            "driver_peak_rss_mb_small": max(r["peak_rss_mb"] for r in ray), "driver_peak_rss_mb_large": big["peak_rss_mb"]}


def one_vs_two_nodes(run_dir, small, tmp, args) -> dict:
    """The same files on one 1-CPU node (one actor), then with a second 1-CPU node (two actors)."""
    one, two = [], []
    with LocalRayCluster(object_store_mb=args.object_store_mb) as cluster:
        cluster.add_node(num_cpus=1)
        warm_up(cluster, run_dir, tmp, args, 1, 0.5)
        for rep in range(args.reps):
            one.append(timed_predict(run_dir, small, tmp / f"n1_{rep}.csv", ray_args(cluster, 1, 0.5, args.batch_size)))
            print(f"rep {rep}: one node {one[-1]['files_per_s']}/s", flush=True)
        cluster.add_node(num_cpus=1)
        warm_up(cluster, run_dir, tmp, args, 2, 0.5)
        for rep in range(args.reps):
            two.append(timed_predict(run_dir, small, tmp / f"n2_{rep}.csv", ray_args(cluster, 2, 0.5, args.batch_size)))
            print(f"rep {rep}: two nodes {two[-1]['files_per_s']}/s ({two[-1]['engine_report']})", flush=True)
    r1 = statistics.median(r["files_per_s"] for r in one)
    r2 = statistics.median(r["files_per_s"] for r in two)
    return {"one_node": one, "two_nodes": two, "one_node_files_per_s": r1, "two_nodes_files_per_s": r2,
            "two_vs_one_node": round(r2 / r1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500, help="folder for the throughput comparisons")
    ap.add_argument("--large", type=int, default=5000, help="folder for the driver's peak memory")
    ap.add_argument("--workers", type=int, default=1, help="local engine: decoding processes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions; medians are reported")
    ap.add_argument("--object-store-mb", type=int, default=256, help="object store of each Ray node")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, 48 / 192 files, one rep, no warm-up job (checks the script)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.large, args.reps, args.batch_size = 48, 192, 1, 16

    from medtransfer.data.demo import generate_demo_dataset

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        src = generate_demo_dataset(tmp / "src", n_patients=8 if args.quick else 30, seed=3)
        small, large = tmp / "small", tmp / "large"
        make_folder(src / "images", small, args.files)
        make_folder(src / "images", large, args.large)
        args.warmup = None
        if not args.quick:
            args.warmup = tmp / "warmup"
            make_folder(src / "images", args.warmup, 2 * args.batch_size)
        run_dir = tiny_run(tmp / "run") if args.quick else make_run(tmp / "run")
        result = local_vs_ray(run_dir, small, large, tmp, args)
        result["scaling"] = one_vs_two_nodes(run_dir, small, tmp, args)

    import ray
    import torch

    result["settings"] = {"files": args.files, "large": args.large, "workers": args.workers,
                          "batch_size": args.batch_size, "reps": args.reps, "object_store_mb": args.object_store_mb,
                          "model": "tiny_cnn.random, 32 px" if args.quick else "efficientnet_lite0.in1k, 1 channel, 128 px",
                          "quick": args.quick, "decode_task_cpus": 0.5,
                          "one_node": f"{os.cpu_count()} CPUs, 1 actor x 1 CPU",
                          "scaling": "1 CPU per node, one actor x 0.5 CPU per node"}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": str(torch.__version__),
                         "ray": ray.__version__, "platform": platform.platform()}
    if not args.quick:  # a quick run checks the script; its numbers are not results
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("local_files_per_s", "ray_files_per_s", "ray_vs_local",
                                      "driver_peak_rss_mb_small", "driver_peak_rss_mb_large")}
    summary.update({k: result["scaling"][k] for k in ("one_node_files_per_s", "two_nodes_files_per_s",
                                                      "two_vs_one_node")})
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
