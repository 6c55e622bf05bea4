"""The output table of a PACS job, written as :mod:`medtransfer.inference.batch` writes a folder's:
rows appended to ``OUT.partial`` and flushed chunk by chunk, moved into place at the end; on
``--resume`` the complete rows already written are kept and their inputs not done again."""
from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from medtransfer.hospital.selection import Unit
from medtransfer.inference.batch import BASE_FIELDS, PATIENT_FIELDS, _complete_rows


def classification_fields(label_names: Iterable[str], patient_fields: bool, per_series: bool) -> list[str]:
    """The columns of ``predict`` (the same as for a folder)."""
    return (BASE_FIELDS + (PATIENT_FIELDS if patient_fields else []) + (["files"] if per_series else [])
            + [f"prob_{n}" for n in label_names] + ["predicted"])


def segmentation_fields(label_names: Iterable[str]) -> list[str]:
    """Columns of a segmentation job over a PACS: one row per series, its structure volumes and SEG."""
    return BASE_FIELDS + ["files"] + [f"volume_ml_{n}" for n in list(label_names)[1:]] + ["seg_sop_instance_uid"]


def unit_row(unit: Unit, status: str, reason: str, with_files: bool) -> dict[str, Any]:
    """A row for a unit that gets no prediction (skipped by the selection, not retrievable, …)."""
    row: dict[str, Any] = {"path": unit.key, "status": status, "reason": reason, **unit.ids()}
    if with_files:
        row["files"] = ";".join(rec.key for rec in unit.records)
    return row


class RowLog:
    """``OUT.partial`` while the job runs (previous rows first on resume), ``OUT`` when it ends."""

    def __init__(self, out_csv: str | os.PathLike[str], fields: list[str], resume: bool):
        self.out = Path(out_csv)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.fields = fields
        rows = (_complete_rows(self.out, fields) + _complete_rows(self.partial, fields)) if resume else []
        self.previous: list[dict[str, str]] = []
        self.done: set[str] = set()
        for row in rows:  # each input once, also when a finished and an interrupted output both exist
            if row["path"] not in self.done:
                self.done.add(row["path"])
                self.previous.append(row)
        self.counts: Counter = Counter(r["status"] for r in self.previous)
        self._fh = None
        self._writer: csv.DictWriter | None = None

    def __enter__(self) -> RowLog:
        self._fh = open(self.partial, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, restval="", extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(self.previous)
        self._fh.flush()
        return self

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        self._writer.writerows(rows)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.counts.update(r["status"] for r in rows)

    def __exit__(self, exc_type, *_) -> None:
        self._fh.close()
        if exc_type is None:
            os.replace(self.partial, self.out)
