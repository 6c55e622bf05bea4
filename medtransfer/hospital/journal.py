"""The listener's durable journal (SQLite, synchronous writes): every received instance and every
batch with its state, so that a restart loses nothing and repeats nothing.

* An instance is journaled after its file is on disk and before the C-STORE is answered: a
  success status means it is kept.
* A batch takes the instances of one study that have been quiet for the quiet period, in one
  transaction; an instance belongs to at most one batch, ever (a repeated C-STORE of an instance
  already in a batch is acknowledged and dropped).
* Batch states: ``pending`` (taken; rows not yet written) → ``predicted`` (rows written; results
  not all delivered) → ``delivered``. A restart takes up each batch at its state.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL, received_at REAL NOT NULL, calling_aet TEXT NOT NULL DEFAULT '', batch_id INTEGER
);
CREATE INDEX IF NOT EXISTS instances_waiting ON instances (batch_id, study_uid);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study_uid TEXT NOT NULL, state TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, note TEXT NOT NULL DEFAULT ''
);
"""
STATES = ("pending", "predicted", "delivered")


@dataclass(frozen=True)
class JournaledInstance:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class Batch:
    id: int
    study_uid: str
    state: str
    attempts: int
    updated_at: float


class Journal:
    """Thread-safe access to the journal file (one connection, one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record(self, inst: JournaledInstance, calling_aet: str = "", now: float | None = None) -> bool:
        """Journal a received instance; False when it is already in a batch (a repeat: drop the file)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT batch_id FROM instances WHERE sop_uid = ?", (inst.sop_uid,)).fetchone()
            if row is not None and row[0] is not None:
                return False
            db.execute("INSERT OR REPLACE INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, path, "
                       "received_at, calling_aet, batch_id) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                       (inst.sop_uid, inst.study_uid, inst.series_uid, inst.sop_class_uid, inst.path, now, calling_aet))
        return True

    def due_studies(self, quiet_period: float, now: float | None = None) -> list[str]:
        """Studies with instances in no batch, none received within the last ``quiet_period`` seconds."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT study_uid FROM instances WHERE batch_id IS NULL GROUP BY study_uid "
                                    "HAVING MAX(received_at) <= ? ORDER BY MIN(received_at)",
                                    (now - quiet_period,)).fetchall()
        return [r[0] for r in rows]

    def open_batch(self, study_uid: str, now: float | None = None) -> Batch | None:
        """A ``pending`` batch with every waiting instance of the study (None when none waits)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            waiting = db.execute("SELECT COUNT(*) FROM instances WHERE batch_id IS NULL AND study_uid = ?",
                                 (study_uid,)).fetchone()[0]
            if not waiting:
                return None
            cur = db.execute("INSERT INTO batches (study_uid, state, created_at, updated_at) VALUES (?, 'pending', ?, ?)",
                             (study_uid, now, now))
            batch_id = cur.lastrowid
            db.execute("UPDATE instances SET batch_id = ? WHERE batch_id IS NULL AND study_uid = ?", (batch_id, study_uid))
        return Batch(batch_id, study_uid, "pending", 0, now)

    def instances(self, batch_id: int) -> list[JournaledInstance]:
        with self._lock:
            rows = self._db.execute("SELECT sop_uid, study_uid, series_uid, sop_class_uid, path FROM instances "
                                    "WHERE batch_id = ? ORDER BY sop_uid", (batch_id,)).fetchall()
        return [JournaledInstance(*r) for r in rows]

    def unfinished(self) -> list[Batch]:
        """Batches a restart must take up (``pending`` or ``predicted``), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, study_uid, state, attempts, updated_at FROM batches "
                                    "WHERE state != 'delivered' ORDER BY id").fetchall()
        return [Batch(*r) for r in rows]

    def set_state(self, batch_id: int, state: str, note: str = "", attempt: bool = False) -> None:
        if state not in STATES:
            raise ValueError(f"unknown batch state {state!r}")
        with self._tx() as db:
            db.execute("UPDATE batches SET state = ?, note = ?, updated_at = ?, attempts = attempts + ? WHERE id = ?",
                       (state, note, time.time(), int(attempt), batch_id))

    def counts(self) -> dict[str, int]:
        """Instances waiting and batches by state (for status lines and tests)."""
        with self._lock:
            waiting = self._db.execute("SELECT COUNT(*) FROM instances WHERE batch_id IS NULL").fetchone()[0]
            states = dict(self._db.execute("SELECT state, COUNT(*) FROM batches GROUP BY state").fetchall())
        return {"waiting": waiting, **{s: states.get(s, 0) for s in STATES}}

    def known_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances").fetchall()}

    def close(self) -> None:
        with self._lock:
            self._db.close()
