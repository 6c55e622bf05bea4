"""Where result objects (SR, SEG) go: a folder always, and a PACS when one is named (STOW-RS or
C-STORE). ``sent.tsv`` in the folder records what reached the destination, so a resumed job sends
what is missing and nothing twice (the objects' UIDs are stable, so even a repeat replaces)."""
from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

SENT_LOG = "sent.tsv"


class ResultSink:
    """Writes result objects into ``folder`` (atomically) and stores them on ``destination``."""

    def __init__(self, folder: str | os.PathLike[str], destination=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.destination = destination
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self._sent = self._read_sent()
        self._lock = threading.Lock()  # reports may be delivered from a writer thread

    @property
    def target(self) -> str:
        return self.destination.describe() if self.destination is not None else ""

    def _read_sent(self) -> set[tuple[str, str]]:
        path = self.folder / SENT_LOG
        if not path.is_file():
            return set()
        pairs = set()
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                pairs.add((parts[0], parts[2]))
        return pairs

    def done(self, name: str) -> bool:
        """Written, and sent when there is a destination."""
        return (self.folder / name).is_file() and (self.destination is None or (name, self.target) in self._sent)

    def deliver(self, name: str, dataset=None, written: bool = False) -> Path:
        """Write ``dataset`` as ``folder/name`` (unless ``None``: the file is there already; ``written``:
        it was just written there by a report process) and send it."""
        with self._lock:
            return self._deliver(name, dataset, written)

    def _deliver(self, name: str, dataset, written: bool) -> Path:
        path = self.folder / name
        if dataset is not None:
            tmp = path.with_name(f".{name}.tmp{os.getpid()}")
            dataset.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, path)
        if dataset is not None or written:
            self.counts["written"] += 1
        if self.destination is not None and (name, self.target) not in self._sent:
            self._send(name, path)
        return path

    def _send(self, name: str, path: Path) -> None:
        import pydicom

        uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        failed = self.destination.store([path])
        if failed:
            reason = failed.get(uid) or next(iter(failed.values()))
            self.counts["send failed"] += 1
            self.failures.append(f"{name}: {reason}")
            logger.warning("result %s not stored on %s: %s", name, self.target, reason)
            return
        with open(self.folder / SENT_LOG, "a") as fh:
            fh.write(f"{name}\t{uid}\t{self.target}\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._sent.add((name, self.target))
        self.counts["sent"] += 1
