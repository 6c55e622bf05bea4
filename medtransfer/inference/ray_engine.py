"""``predict --engine ray``: the batch prediction of :mod:`medtransfer.inference.batch` on Ray Data.

* The work list (files; series for 3D models) becomes a Ray dataset. Decoding runs as Ray CPU tasks
  with :func:`~medtransfer.inference.batch.decode_item`, the code the local engine runs; the model
  runs in a pool of actors that each load the run directory once and apply
  :class:`~medtransfer.inference.batch.ModelStep` and :class:`~medtransfer.inference.batch.RowBuilder`.
  The rows, statuses and reasons are the local engine's; only their order (completion order) differs.
* Rows are written by the driver as they arrive, one Parquet part per block under ``<out>.parts/``
  (atomically), so memory stays bounded; the CSV is assembled from the parts at the end. The parts
  also record which node decoded and which node predicted each row (``decode_node``, ``model_node``).
* Exactly once: an input whose row was already written is never written again (a block repeated
  after a failure is dropped and counted). A decoding failure is an ``error`` row; a task whose
  worker or node dies is retried by Ray, a dead model actor is restarted.
* ``resume=True`` keeps the rows already in the parts (and those a CSV of either engine holds) and
  predicts only the rest.
* Every node reads the inputs and the run directory at the same path (shared storage) and runs the
  same medtransfer version.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer.errors import MedTransferError, UsageError
from medtransfer.inference.batch import (
    BatchSummary,
    DecodedItem,
    ModelStep,
    PredictOptions,
    PredictionTable,
    RowBuilder,
    SeriesFilter,
    WorkItem,
    decode_item,
    finish_outputs,
    input_folder,
    output_fields,
    options_with,
    output_lock,
    shard_slice,
    work_items,
)

logger = logging.getLogger(__name__)

RAY_INSTALL = 'pip install "medtransfer[ray]"'
# A decoding task asks for half a core: decoding waits on storage as much as it computes, and a node
# that also hosts model actors keeps room to decode (a whole core per task could leave none).
DECODE_TASK_CPUS = 0.5
INDEX, DECODE_NODE, MODEL_NODE = "input_index", "decode_node", "model_node"


def import_ray():
    """The ``ray`` module with Ray Data, or a message with the install line."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine ray needs Ray Data, which is not installed: {RAY_INSTALL} "
                         "(or use the default --engine local).") from None
    return ray


@dataclass
class RayOptions:
    """Where and how wide the Ray job runs."""

    address: str | None = None
    """``auto``, ``HOST:PORT`` of the head node, or None: a Ray instance started for this job."""
    actors: int | None = None
    """Model actors; None: one per GPU when ``num_gpus_per_actor`` > 0, else one."""
    num_gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    """CPU cores an actor reserves (on a CPU-only cluster also the model's torch threads). Equal to
    ``DECODE_TASK_CPUS`` with no GPU, Ray Data fuses decoding into the actors."""


@dataclass
class NodeStats:
    """What one node of the cluster did in a job."""

    decoded: int = 0
    predicted: int = 0


@dataclass
class RayBatchSummary(BatchSummary):
    parts_dir: Path | None = None
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    """Per node (``<node id prefix>@<ip>``): rows decoded and rows predicted there in this job."""
    seconds: float = 0.0
    """Wall time of the Ray part of the job: joining the cluster, predicting, leaving it."""
    repeated: int = 0
    """Rows that arrived a second time (after a failure) and were dropped."""

    def report_lines(self) -> list[str]:
        """The job's throughput, overall and per node, as lines for a person."""
        new = sum(n.predicted for n in self.nodes.values())
        rate = new / self.seconds if self.seconds else 0.0
        lines = [f"ray: {new} rows in {self.seconds:.1f} s ({rate:.1f} rows/s) on {len(self.nodes)} node(s)"
                 + (f"; {self.repeated} repeated rows dropped" if self.repeated else "")]
        for name, n in sorted(self.nodes.items()):
            node_rate = n.predicted / self.seconds if self.seconds else 0.0
            lines.append(f"  node {name or '(earlier run)'}: decoded {n.decoded}, predicted {n.predicted} "
                         f"({node_rate:.1f} rows/s)")
        return lines


def _node_name() -> str:
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:8]}@{ray.util.get_node_ip_address()}"


def _decode_batch(batch, spec, dims: int, filt: SeriesFilter, patient_fields: bool) -> dict[str, Any]:
    """Ray CPU task: decode a block of work items with the local engine's :func:`decode_item`."""
    from medtransfer.data.preprocess import Preprocessor

    pre, node = Preprocessor(spec), _node_name()
    out: dict[str, list] = {k: [] for k in (INDEX, "key", "paths", "status", "reason", "ids", "tensor", DECODE_NODE)}
    for rec in batch.to_pylist():
        item = WorkItem(rec["key"], list(rec["paths"]), rec["status"], rec["reason"], json.loads(rec["ids"]))
        d = decode_item(item, pre, dims, filt, patient_fields, index=rec[INDEX])
        # No tensor: an empty array with the tensor's rank, so every block has one tensor column type.
        tensor = d.tensor.numpy() if d.tensor is not None else np.zeros((0,) * (dims + 1), np.float32)
        for k, v in ((INDEX, d.index), ("key", item.key), ("paths", item.paths), ("status", d.status),
                     ("reason", d.reason), ("ids", json.dumps(d.ids)), ("tensor", tensor), (DECODE_NODE, node)):
            out[k].append(v)
    return out


class _PredictActor:
    """Ray actor: loads the run directory once, then predicts decoded blocks into output rows."""

    def __init__(self, run_dir: str, device: str, patient_fields: bool):
        from medtransfer.inference import load_run

        run = load_run(run_dir, device)
        self.model, self.rows, self.node = ModelStep(run), RowBuilder(run, patient_fields), _node_name()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import torch

        decoded = [DecodedItem(int(i), torch.tensor(t) if t.size else None, s, r, json.loads(ids))
                   for i, t, s, r, ids in zip(batch[INDEX], batch["tensor"], batch["status"], batch["reason"],
                                              batch["ids"])]
        items = [WorkItem(k, list(p)) for k, p in zip(batch["key"], batch["paths"])]
        rows = [self.rows.row(it, d, p) for it, d, p in zip(items, decoded, self.model.probabilities(decoded))]
        out: dict[str, list] = {f: [r.get(f, "") for r in rows] for f in self.rows.fields}
        out[INDEX] = [d.index for d in decoded]
        out[DECODE_NODE] = list(batch[DECODE_NODE])
        out[MODEL_NODE] = [self.node] * len(rows)
        return out


class PartStore:
    """``<out>.parts/part-<n>.parquet``: the rows of a job as they arrive, each part written
    atomically; the source of the final CSV and of what ``resume`` keeps."""

    def __init__(self, out_csv: Path, fields: list[str]):
        import pyarrow as pa

        self.dir = out_csv.with_name(out_csv.name + ".parts")
        self.fields = fields
        self.schema = pa.schema([(f, pa.string()) for f in fields]
                                + [(INDEX, pa.int64()), (DECODE_NODE, pa.string()), (MODEL_NODE, pa.string())])
        self._next = 0

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []

    def clear(self) -> None:
        for p in self.files() + list(self.dir.glob(".part-*.tmp") if self.dir.is_dir() else []):
            p.unlink()

    def done_keys(self) -> set[str]:
        """The ``path`` of every row already written; checks the parts have this job's columns."""
        import pyarrow.parquet as pq

        done: set[str] = set()
        for p in self.files():
            names = pq.read_schema(p).names
            if names != self.schema.names:
                raise MedTransferError(f"Cannot resume from '{self.dir}': its columns differ from this model's "
                                       f"({', '.join(self.fields)}). Use another --out or remove the folder.")
            done.update(pq.read_table(p, columns=["path"]).column("path").to_pylist())
        return done

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self._next:
            files = self.files()
            self._next = int(files[-1].stem.split("-")[1]) + 1 if files else 1
        target = self.dir / f"part-{self._next:08d}.parquet"
        tmp = self.dir / f".{target.stem}.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), tmp)
        os.replace(tmp, target)
        self._next += 1

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every written row, part by part, one record batch in memory at a time."""
        import pyarrow.parquet as pq

        for p in self.files():
            for rb in pq.ParquetFile(p).iter_batches(columns=self.fields):
                yield from rb.to_pylist()


def _adopt_csv_rows(parts: PartStore, rows: Iterable[dict[str, str]], done: set[str], chunk: int = 1000) -> int:
    """Rows of a CSV left by an earlier run (either engine) that the parts lack become parts."""
    pending: list[dict[str, Any]] = []
    n = 0
    for r in rows:
        if r["path"] in done:
            continue
        done.add(r["path"])
        pending.append({**r, INDEX: -1, DECODE_NODE: "", MODEL_NODE: ""})
        if len(pending) >= chunk:
            parts.write(pending)
            n, pending = n + len(pending), []
    parts.write(pending)
    return n + len(pending)


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A HOST:PORT that nothing listens on fails now (Ray itself would retry for minutes)."""
    if not address or address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise MedTransferError(
            f"No Ray cluster answers at '{address}' ({exc}). Give the head node's address as 'ray start --head' "
            "printed it (HOST:PORT, port 6379 by default), 'auto' on a node of the cluster, or leave --address "
            "out to run on this machine."
        ) from None


def _connect(ray, address: str | None) -> None:
    _check_reachable(address)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a Ray instance of our own for this job
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MedTransferError(
            f"Cannot join the Ray cluster at '{address}': {str(exc).rstrip('.')}. Start one with 'ray start --head' (and "
            "'ray start --address HEAD:PORT' on the other nodes), or leave --address out to run on this machine."
        ) from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's bar counts written rows
    ctx.execution_options.preserve_order = False


def _actor_count(ray, options: RayOptions) -> int:
    """The actor pool's size, checked against the cluster: a pool that cannot be placed, or that
    leaves no CPU for decoding, would wait forever instead of failing."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    n = options.actors or (max(1, int(gpus // options.num_gpus_per_actor)) if options.num_gpus_per_actor else 1)
    if n * options.num_gpus_per_actor > gpus:
        raise UsageError(f"{n} actor(s) × {options.num_gpus_per_actor:g} GPU need more than the cluster's "
                         f"{gpus:g} GPU(s): lower --actors or --num-gpus-per-actor, or add GPU nodes.")
    if cpus - n * options.cpus_per_actor < DECODE_TASK_CPUS:
        raise UsageError(f"{n} actor(s) × {options.cpus_per_actor:g} CPU leave less than "
                         f"{DECODE_TASK_CPUS:g} of the cluster's {cpus:g} CPU(s) for decoding: "
                         "lower --cpus-per-actor or --actors.")
    return n


def _dataset(ray, items: list[WorkItem], todo: list[int], job: "_JobSpec"):
    """The Ray dataset: work items → decoding tasks → model actors → rows."""
    spec, options = job.run.pre.spec, job.options
    records = [{INDEX: i, "key": items[i].key, "paths": items[i].paths, "status": items[i].status,
                "reason": items[i].reason, "ids": json.dumps(items[i].ids)} for i in todo]
    ds = ray.data.from_items(records, override_num_blocks=max(1, -(-len(records) // job.batch_size)))
    ds = ds.map_batches(_decode_batch, batch_size=job.batch_size, batch_format="pyarrow", num_cpus=DECODE_TASK_CPUS,
                        fn_kwargs={"spec": spec, "dims": spec.dims, "filt": job.filt,
                                   "patient_fields": job.patient_fields})
    return ds.map_batches(_PredictActor, batch_size=job.batch_size, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=_actor_count(ray, options)),
                          num_cpus=options.cpus_per_actor, num_gpus=options.num_gpus_per_actor or None,
                          fn_constructor_kwargs={"run_dir": str(job.run_dir), "device": job.device,
                                                 "patient_fields": job.patient_fields})


@dataclass
class _Tally:
    """What the driver has seen of a job so far."""

    counts: Counter = field(default_factory=Counter)
    nodes: dict[str, NodeStats] = field(default_factory=dict)
    repeated: int = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.counts.update(r["status"] for r in rows)
        for r in rows:
            self.nodes.setdefault(r[DECODE_NODE], NodeStats()).decoded += 1
            self.nodes.setdefault(r[MODEL_NODE], NodeStats()).predicted += 1


def _stream(ds, parts: PartStore, done: set[str], total: int, progress: bool) -> _Tally:
    """Consume the dataset as it completes: each new row written once, into a part."""
    from rich.progress import Progress

    tally = _Tally()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("predicting (ray)", total=total)
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = [r for r in block.to_pylist() if r["path"] not in done]
            tally.repeated += block.num_rows - len(rows)
            parts.write(rows)
            done.update(r["path"] for r in rows)
            tally.add(rows)
            bar.advance(task, len(rows))
    return tally


def _job_error(exc: BaseException, parts: PartStore) -> MedTransferError:
    """A failed Ray job as a message; a medtransfer error raised inside a task keeps its own message."""
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MedTransferError):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MedTransferError(f"The Ray job stopped: {first}. The rows written so far are kept in '{parts.dir}'; "
                            "run the same command with --resume to do the rest.")


def run_batch_ray(run_dir: str | os.PathLike[str], input_dir: str | os.PathLike[str],
                  out_csv: str | os.PathLike[str], options: PredictOptions | None = None, *,
                  ray_options: RayOptions | None = None, device: str = "auto", **overrides: Any) -> RayBatchSummary:
    """Predict every input under ``input_dir`` with the run of ``run_dir`` on a Ray cluster; write
    ``out_csv`` (the local engine's rows, in completion order) and its Parquet parts. ``options`` and
    keyword ``overrides`` as for the local engine (:class:`~medtransfer.inference.batch.PredictOptions`;
    ``workers`` does not apply: decoding runs as Ray tasks); ``ray_options``: where and how wide."""
    from medtransfer.inference import load_run

    ray = import_ray()
    opts = options_with(options, overrides)
    run = load_run(run_dir, "cpu")  # the driver's copy: columns, labels, the study JSON's model section
    job = _JobSpec(run, run_dir, ray_options or RayOptions(), device, opts)
    items = shard_slice(work_items(input_folder(input_dir), run.pre.spec.dims, opts.series_filter), opts.shard)
    with output_lock(out_csv):
        return _locked_job(ray, job, items, out_csv)


def _locked_job(ray, job: "_JobSpec", items: list[WorkItem], out_csv: str | os.PathLike[str]) -> RayBatchSummary:
    opts = job.opts
    fields = output_fields(job.run.label_names, job.run.pre.spec.dims, opts.patient_fields)
    table, parts = PredictionTable(out_csv, fields), PartStore(Path(out_csv), fields)
    if opts.resume:
        done = parts.done_keys()
        adopted = _adopt_csv_rows(parts, table.completed_rows([it.key for it in items]), done)
        logger.info("resume: %d of %d inputs already done (%d from a CSV)", len(done), len(items), adopted)
    else:
        parts.clear()
        done = set()
    todo = [i for i, it in enumerate(items) if it.key not in done]
    start = time.perf_counter()
    tally = _run_on_ray(ray, job, items, todo, parts, done, opts.progress) if todo else _Tally()
    seconds = time.perf_counter() - start
    counts: Counter = Counter()
    with table:
        table.write(_counted(parts.rows(), counts))
    out = table.commit()
    finish_outputs(out, job.run, opts)
    logger.info("%d inputs: %s -> %s (%d new in %.1f s on %d node(s))", sum(counts.values()), dict(counts), out,
                sum(tally.counts.values()), seconds, len({n for n in tally.nodes if n}))
    return RayBatchSummary(out, counts, None, parts.dir, tally.nodes, seconds, tally.repeated)


@dataclass
class _JobSpec:
    """What the Ray dataset of a job is built from."""

    run: Any
    run_dir: str | os.PathLike[str]
    options: RayOptions
    device: str
    opts: PredictOptions

    @property
    def batch_size(self) -> int:
        return self.opts.batch_size

    @property
    def filt(self) -> SeriesFilter:
        return self.opts.series_filter

    @property
    def patient_fields(self) -> bool:
        return self.opts.patient_fields


def _run_on_ray(ray, job: _JobSpec, items: list[WorkItem], todo: list[int], parts: PartStore, done: set[str],
                progress: bool) -> _Tally:
    """Join the cluster, stream the job's rows into the parts, leave the cluster."""
    _connect(ray, job.options.address)
    try:
        return _stream(_dataset(ray, items, todo, job), parts, done, len(todo), progress)
    except MedTransferError:
        raise
    except Exception as exc:  # a Ray failure past its retries: the message says how to resume
        raise _job_error(exc, parts) from None
    finally:
        ray.shutdown()


def _counted(rows: Iterable[dict[str, Any]], counts: Counter) -> Iterator[dict[str, Any]]:
    for r in rows:
        counts[r["status"]] += 1
        yield r
