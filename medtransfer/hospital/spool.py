"""Retrieval in chunks into a spool folder on disk, one chunk ahead of the model.

A background thread retrieves chunk k+1 while chunk k is decoded and predicted; at most three
chunks are on disk at once (the one being predicted, one ready, one arriving) and none is kept in
memory. Each chunk is deleted once its rows are written. The spool holds patient images: it sits
beside the job's table (``.OUT.spool``, or under the ``spool_dir`` setting), readable by its owner
only, and is removed at the end, also when the job fails; a job killed outright leaves it to the
next job on the same table (``--resume``), which removes it first.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medtransfer.hospital.selection import Unit

logger = logging.getLogger(__name__)

MAX_CHUNK_FACTOR = 8
"""A chunk ends at a series boundary once it holds ``chunk_size`` instances, or inside a series at
``MAX_CHUNK_FACTOR × chunk_size`` (whole series come in one request; huge ones are split)."""


@dataclass
class Chunk:
    """Consecutive work units; the retrieved ones are under ``folder/<series uid>/<sop uid>.dcm``."""

    index: int
    units: list[Unit]
    folder: Path | None = None
    failures: dict[str, str] = field(default_factory=dict)
    """``{sop uid: reason}`` for instances that could not be retrieved."""

    def to_retrieve(self) -> list:
        return [rec for u in self.units if not u.status for rec in u.records]

    def path_of(self, rec) -> Path:
        return self.folder / rec.series_uid / f"{rec.sop_uid}.dcm"


def make_chunks(units: Sequence[Unit], chunk_size: int) -> list[Chunk]:
    """Split the work list into chunks of about ``chunk_size`` instances to retrieve."""
    chunks: list[Chunk] = []
    current: list[Unit] = []
    count = 0
    for i, unit in enumerate(units):
        current.append(unit)
        count += 0 if unit.status else len(unit.records)
        nxt = units[i + 1] if i + 1 < len(units) else None
        boundary = nxt is None or nxt.series_uid != unit.series_uid
        if nxt is None or (count >= chunk_size and boundary) or count >= chunk_size * MAX_CHUNK_FACTOR:
            chunks.append(Chunk(len(chunks), current))
            current, count = [], 0
    return chunks


class Prefetcher:
    """Iterate over chunks with their instances retrieved, retrieval running one chunk ahead."""

    def __init__(self, pacs, chunks: Sequence[Chunk], series_sizes: Mapping[str, int], root: Path):
        self.pacs, self.chunks, self.series_sizes = pacs, list(chunks), series_sizes
        self.root = Path(root)
        shutil.rmtree(self.root, ignore_errors=True)  # what a killed job left: its images go now
        self.root.mkdir(mode=0o700, parents=True)
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacs-retrieve", daemon=True)

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting to hand over a chunk
            try:
                self._ready.get(timeout=0.1)
            except queue.Empty:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self) -> None:
        for chunk in self.chunks:
            if self._stop.is_set():
                return
            try:
                chunk.folder = self.root / f"chunk{chunk.index:06d}"
                chunk.folder.mkdir()
                records = chunk.to_retrieve()
                if records:
                    chunk.failures = self.pacs.retrieve(records, chunk.folder, self.series_sizes)
                item: Chunk | BaseException = chunk
            except BaseException as exc:  # handed to the consumer, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> Iterator[Chunk]:
        for _ in self.chunks:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            shutil.rmtree(item.folder, ignore_errors=True)
