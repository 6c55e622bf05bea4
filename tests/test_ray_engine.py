"""``predict --engine ray`` on a real two-node Ray cluster started on this machine: the same rows as
the local engine, work on both nodes, every row exactly once when a node dies or the driver is
killed and resumed; the local engine never imports Ray."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from conftest import _write_sr, shared_data
from test_batch_inference import make_run

N_COPIES = 5  # copies of the demo images: with the broken files, a few hundred inputs


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medtransfer", "predict", *map(str, args)]


def _env() -> dict[str, str]:
    from ray_cluster import CLUSTER_ENV

    return {**os.environ, **CLUSTER_ENV, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inbox(small_demo, tmp_path_factory) -> Path:
    """Copies of the demo DICOM files (with and without a suffix) mixed with broken and non-image files."""
    folder = tmp_path_factory.mktemp("inbox")
    images = sorted((small_demo / "images").rglob("*.dcm"))
    for c in range(N_COPIES):
        for i, f in enumerate(images):
            target = folder / f"copy{c}" / (f"IM{i:04d}" if i % 2 else f"img{i:04d}.dcm")
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(f, target)
    broken = folder / "broken"
    broken.mkdir()
    (broken / "empty.dcm").write_bytes(b"")
    (broken / "notes.txt").write_text("not DICOM\n")
    (broken / "._IM0001").write_bytes(b"\x00\x05\x16\x07" + bytes(60))
    data = images[0].read_bytes()
    (broken / "truncated.dcm").write_bytes(data[: len(data) // 3])
    ds = pydicom.dcmread(images[0])
    ds.PixelData = ds.PixelData[:-1000]
    ds.save_as(broken / "short_pixels.dcm")
    _write_sr(broken / "report.dcm")
    return folder


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny2d")


@pytest.fixture(scope="module")
def local_rows(run2d, inbox, tmp_path_factory):
    from medtransfer.inference import predict_folder

    out = tmp_path_factory.mktemp("local") / "local.csv"
    predict_folder(run2d, inbox, out, batch_size=16)
    return _csv(out)


def test_local_engine_never_imports_ray(run2d, small_demo, tmp_path):
    code = ("import sys\nfrom medtransfer.cli.main import app\n"
            f"try:\n    app({['predict', str(run2d), str(small_demo / 'images'), '--out', str(tmp_path / 'p.csv'), '-q']!r})\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('RAY_IMPORTED' if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 'NO_RAY')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "NO_RAY"
    assert len(_csv(tmp_path / "p.csv")) == len(list((small_demo / "images").rglob("*.dcm")))


def test_engine_ray_without_ray_says_how_to_install(run2d, small_demo, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from medtransfer.cli.main import app

    monkeypatch.setitem(sys.modules, "ray", None)  # 'import ray' now fails as if Ray were not installed
    res = CliRunner().invoke(app, ["predict", str(run2d), str(small_demo / "images"), "--out", str(tmp_path / "p.csv"),
                                   "--engine", "ray", "-q"])
    assert res.exit_code == 2  # bad usage: found before any work
    assert 'pip install "medtransfer[ray]"' in " ".join(res.output.split())
    assert not (tmp_path / "p.csv").exists()


def test_an_address_nothing_answers_on_fails_at_once(run2d, small_demo, tmp_path):
    pytest.importorskip("ray.data", reason='the Ray engine needs Ray Data: pip install "medtransfer[ray]"')
    from typer.testing import CliRunner

    from medtransfer.cli.main import app
    from ray_cluster import free_port

    start = time.perf_counter()
    res = CliRunner().invoke(app, ["predict", str(run2d), str(small_demo / "images"), "--out", str(tmp_path / "p.csv"),
                                   "--engine", "ray", "--address", f"127.0.0.1:{free_port()}", "-q"])
    assert res.exit_code == 1
    assert "No Ray cluster answers at '127.0.0.1:" in " ".join(res.output.split())
    assert time.perf_counter() - start < 30  # Ray alone would retry for minutes


# ---------------------------------------------------------------- on a real two-node cluster

@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray.data", reason='the Ray engine needs Ray Data: pip install "medtransfer[ray]"')
    from ray_cluster import LocalRayCluster

    c = LocalRayCluster(object_store_mb=100)
    try:
        c.add_node(num_cpus=1)
        c.add_node(num_cpus=1)
        yield c
    finally:
        pids = [n.proc.pid for n in c.nodes]
        c.stop()
        from ray_cluster import session_pids

        assert not [p for sid in pids for p in session_pids(sid)], "Ray processes left behind"


def _ray_args(cluster, run2d, inbox, out, *extra):
    # Half a core per decoding task and a quarter per actor: after one of the two 1-CPU nodes is
    # lost, the head alone still fits both actors and a decoding task.
    return _cli(run2d, inbox, "--out", out, "--engine", "ray", "--address", cluster.address, "--actors", "2",
                "--cpus-per-actor", "0.25", "--batch-size", "8", "-q", *extra)


def _assert_same_rows(rows, local_rows):
    assert len(rows) == len(local_rows)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a row was written twice"
    for want in local_rows:
        got = by_path[want["path"]]
        assert (got["status"], got["reason"], got["sop_instance_uid"], got["predicted"]) == (
            want["status"], want["reason"], want["sop_instance_uid"], want["predicted"])
        for col in ("prob_negative", "prob_positive"):
            if want[col]:
                assert abs(float(got[col]) - float(want[col])) <= 1e-6 + 1e-12
            else:
                assert got[col] == ""


def _parts(out: Path):
    import pyarrow.parquet as pq

    return pq.read_table(out.with_name(out.name + ".parts")).to_pylist()


def _new_rows(stderr: str) -> int:
    """N of the summary line 'ray: N rows in … s'."""
    line = next(line for line in stderr.splitlines() if line.startswith("ray: "))
    return int(line.split()[1])


def _wait_for_rows(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> int:
    """Rows in the parts once at least ``at_least`` are written (the job still running)."""
    import pyarrow.parquet as pq

    deadline = time.time() + timeout
    parts = out.with_name(out.name + ".parts")
    while time.time() < deadline and proc.poll() is None:
        files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
        n = sum(pq.read_metadata(f).num_rows for f in files)
        if n >= at_least:
            return n
        time.sleep(0.05)
    raise AssertionError(f"the job wrote fewer than {at_least} rows before it ended or timed out "
                         f"(exit {proc.poll()})")


def test_ray_rows_equal_local_and_both_nodes_work(cluster, run2d, inbox, local_rows, tmp_path):
    out = tmp_path / "ray.csv"
    res = subprocess.run(_ray_args(cluster, run2d, inbox, out), capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _csv(out)
    _assert_same_rows(rows, local_rows)
    assert {r["status"] for r in rows} == {"ok", "skipped", "error"}
    parts = _parts(out)
    assert sorted(p["path"] for p in parts) == sorted(r["path"] for r in rows)
    # Decoding tasks are spread over the nodes; batches go to the actor beside their data (Ray Data's
    # locality), so on a busy machine one of the two actors may predict most of them.
    assert len({p["decode_node"] for p in parts}) == 2, "decoding ran on one node only"
    assert {p["model_node"] for p in parts} <= {p["decode_node"] for p in parts}
    assert "on 2 node(s)" in res.stderr and res.stderr.count("  node ") == 2  # the per-node summary


def test_3d_model_predicts_per_series_on_ray_as_locally(cluster, tmp_path):
    from medtransfer.inference import predict_folder

    studies = shared_data("brain_mr_dicom_studies")
    run3d = make_run(tmp_path / "tiny3d", backbone="tiny_cnn3d.random", dims=3, size=16)
    local = _csv(predict_folder(run3d, studies, tmp_path / "local.csv", batch_size=2).out_csv)
    res = subprocess.run(_ray_args(cluster, run3d, studies, tmp_path / "ray.csv"), capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["path"]: r for r in _csv(tmp_path / "ray.csv")}
    assert len(rows) == len(local) == 7
    for want in local:
        got = rows[want["path"]]
        assert (got["status"], got["files"], got["series_instance_uid"]) == (want["status"], want["files"],
                                                                             want["series_instance_uid"])
        assert abs(float(got["prob_positive"]) - float(want["prob_positive"])) <= 1e-6 + 1e-12


def test_actors_that_leave_no_cpu_for_decoding_fail_instead_of_waiting(cluster, run2d, small_demo, tmp_path):
    args = _cli(run2d, small_demo / "images", "--out", tmp_path / "p.csv", "--engine", "ray", "--address",
                cluster.address, "--actors", "2", "--cpus-per-actor", "1", "-q")
    res = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 2
    assert "leave less than 0.5 of the cluster's 2 CPU(s) for decoding" in " ".join(res.stderr.split())


def test_killed_driver_resumes_and_a_node_killed_mid_job_still_gives_every_row_once(
        cluster, run2d, inbox, local_rows, tmp_path):
    out = tmp_path / "ray.csv"
    # 1. the driver dies mid-job: the parts written so far stay
    proc = subprocess.Popen(_ray_args(cluster, run2d, inbox, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_rows(out, proc, at_least=16)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    kept = {p["path"] for p in _parts(out)}
    assert 16 <= len(kept) < len(local_rows) and not out.exists()
    # 2. --resume does the rest; mid-way the worker node's raylet is killed
    proc = subprocess.Popen(_ray_args(cluster, run2d, inbox, out, "--resume"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        written = _wait_for_rows(out, proc, at_least=len(kept) + 16)
        os.kill(cluster.nodes[1].raylet_pid(), signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert written < len(local_rows), "the job ended before the node was killed"
    assert proc.returncode == 0, err[-3000:]
    _assert_same_rows(_csv(out), local_rows)
    parts = _parts(out)
    assert sorted(p["path"] for p in parts) == sorted(r["path"] for r in local_rows)  # every row once
    assert kept <= {p["path"] for p in parts}
    assert _new_rows(err) == len(local_rows) - len(kept)  # only the rest was predicted


def test_parts_keep_rows_once_and_adopt_an_interrupted_csv(tmp_path):
    pytest.importorskip("pyarrow.parquet", reason="the Ray engine's parts need pyarrow (a dependency of ray[data])")
    from medtransfer.inference.batch import output_fields
    from medtransfer.inference.ray_engine import PartStore, _adopt_csv_rows

    fields = output_fields(["negative", "positive"], 2)
    out = tmp_path / "p.csv"
    parts = PartStore(out, fields)
    row = {f: "" for f in fields}
    parts.write([{**row, "path": "a", "status": "ok", "input_index": 0, "decode_node": "n1", "model_node": "n2"}])
    parts.write([])  # nothing to write: no empty part
    assert [p.name for p in parts.files()] == ["part-00000001.parquet"]
    done = parts.done_keys()
    # rows of an interrupted CSV (either engine): those the parts lack become a part, in CSV order
    csv_rows = [{**row, "path": p, "status": "skipped"} for p in ("a", "c", "b")]
    assert _adopt_csv_rows(PartStore(out, fields), csv_rows, done, chunk=1) == 2
    assert done == {"a", "b", "c"}
    assert [(r["path"], r["status"]) for r in PartStore(out, fields).rows()] == [("a", "ok"), ("c", "skipped"),
                                                                                ("b", "skipped")]
    with pytest.raises(Exception, match="columns differ"):
        PartStore(out, output_fields(["negative", "positive"], 3)).done_keys()
    PartStore(out, fields).clear()
    assert not PartStore(out, fields).files()
